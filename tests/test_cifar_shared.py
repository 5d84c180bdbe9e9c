"""The converted pretrained CIFAR-10 ResNets predict exactly as the CNNs on the whole JPEG test set.

Needs ``../shared`` (present in CI and for developers, not for users): the
test is skipped with the reason when it is absent, except in CI (``CI`` set),
where missing data is a failure.
"""

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tcnn_fx
from tcnn_fx.specs import load_model

SHARED = Path(os.environ.get("TCNN_FX_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TAR = SHARED / "data" / "cifar10-jpeg.tar"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

if os.environ.get("CI") and not TAR.is_file():
    raise FileNotFoundError(f"CI must have the shared CIFAR-10 data at {TAR}")
pytestmark = pytest.mark.skipif(not TAR.is_file(), reason=f"shared CIFAR-10 data not found at {TAR}")


@pytest.fixture(scope="module")
def test_set():
    """All 10,000 test images as a normalised tensor, read straight from the tar."""
    images, labels = [], []
    with tarfile.open(TAR) as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and "/test/" in m.name), key=lambda m: m.name)
        classes = sorted({Path(m.name).parent.name for m in members})
        for member in members:
            with Image.open(archive.extractfile(member)) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
            labels.append(classes.index(Path(member.name).parent.name))
    x = (np.stack(images) - MEAN) / STD
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32)), torch.tensor(labels)


@pytest.mark.parametrize(("depth", "every"), [(20, 2), (56, 8)])
def test_converted_model_predicts_like_the_cnn(test_set, depth, every):
    """Every second test image (5,000, all classes) for ResNet-20; every eighth (1,250) for ResNet-56, whose 18
    converted layers make it the slower (the suite's time budget is shared with the ONNX export tests)."""
    weights = next((SHARED / "weights").glob(f"resnet{depth}-*.th"))
    model = load_model(f"cifar:resnet{depth}", weights).eval()
    images, labels = test_set
    assert len(images) == 10_000
    images, labels = images[::every], labels[::every]
    hybrid = tcnn_fx.rewrite(model, "last", (images[:8],)).eval()
    assert len(tcnn_fx.report_of(hybrid).converted) == 2 * (depth - 2) // 6  # both 3x3 convs of each last-stage block
    with torch.no_grad():
        cnn = torch.cat([model(batch) for batch in images.split(500)])
        attention = torch.cat([hybrid(batch) for batch in images.split(500)])
    assert torch.equal(cnn.argmax(1), attention.argmax(1))
    accuracy = (cnn.argmax(1) == labels).float().mean().item()
    assert accuracy > 0.75  # about 81% (ResNet-20) and 83% (ResNet-56) on the JPEG copy, per shared/README.md
    assert ((attention - cnn).abs().max() / cnn.abs().max()) <= 1e-5


def test_shared_tar_fine_tunes_and_hybrid_starts_at_the_cnns_accuracy(tmp_path, monkeypatch):
    """The tar is usable as data (extracted to a cache folder), and epoch 0 of fine-tuning is the CNN exactly."""
    from torch.utils.data import Subset

    from tcnn_fx.training import Preprocessing, Recipe, balanced_subset, evaluate_accuracy, finetune, load_splits

    monkeypatch.setenv("TCNN_FX_CACHE", str(tmp_path / "cache"))
    train, evaluation = load_splits(TAR, Preprocessing(32))
    assert (len(train), len(evaluation)) == (50_000, 10_000) and len(train.classes) == 10
    assert (tmp_path / "cache" / "datasets" / "cifar10-jpeg" / "cifar10" / "train").is_dir()
    evaluation = Subset(evaluation, balanced_subset(evaluation.targets, 50, seed=0))
    model = load_model("cifar:resnet20", next((SHARED / "weights").glob("resnet20-*.th"))).eval()
    cnn_top1 = evaluate_accuracy(model, evaluation)["val_top1"]
    hybrid = tcnn_fx.rewrite(model, "last", (torch.zeros(1, 3, 32, 32),))
    subset = Subset(train, balanced_subset(train.targets, 10, seed=0))
    recipe = Recipe(epochs=1, batch_size=50, lr=0.01, workers=0)
    result = finetune(hybrid, subset, evaluation, recipe, tmp_path / "run", progress=False)
    assert result.history[0]["val_top1"] == cnn_top1 > 0.7
    assert result.history[1]["val_images"] == 500 and (tmp_path / "run" / "last.pt").is_file()
