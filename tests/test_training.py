"""Fine-tuning: recipe, data, the loop (checkpoints, resume, divergence), torchrun, and the CLI."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from imagefolders import COLOURS, write_imagefolder
from models import TinyResNet
from torch import nn

import tcnn_fx
from tcnn_fx.cli import main
from tcnn_fx.training import (
    ImageFolderData,
    Preprocessing,
    Recipe,
    balanced_subset,
    evaluate_accuracy,
    extract,
    find_splits,
    finetune,
    load_splits,
)

MODELS = Path(__file__).with_name("models.py")
RECIPE = Recipe(epochs=2, batch_size=8, lr=0.05, warmup_epochs=0.5, workers=0)
ONE_EPOCH = dataclasses.replace(RECIPE, epochs=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def splits(dataset):
    return load_splits(dataset, Preprocessing(16), in_memory=True)


def hybrid_of_tiny(seed: int = 0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    return tcnn_fx.rewrite(TinyResNet(classes=3).eval(), "stage>=1", (torch.randn(1, 3, 16, 16),))


# --- recipe ------------------------------------------------------------------------------------------------


def test_parameter_groups_decay_and_attention_learning_rate():
    hybrid = hybrid_of_tiny()
    groups = {g["name"]: g for g in Recipe(lr=0.1, attention_lr=0.01, weight_decay=1e-4).parameter_groups(hybrid)}
    assert set(groups) == {"cnn", "cnn (no decay)", "attention", "attention (no decay)"}
    names = {id(p): n for n, p in hybrid.named_parameters()}
    named = {key: {names[id(p)].rsplit(".", 1)[-1] for p in g["params"]} for key, g in groups.items()}
    assert named["attention"] == {"query_weight", "key_weight"}
    assert named["attention (no decay)"] == {"centres", "locality", "gate"}
    assert "weight" in named["cnn"] and "bias" not in named["cnn"]  # conv/linear weights decay, biases and norms do not
    assert groups["attention"]["lr"] == 0.01 and groups["cnn"]["lr"] == 0.1
    assert groups["attention (no decay)"]["weight_decay"] == 0 and groups["cnn"]["weight_decay"] == 1e-4
    assert sum(len(g["params"]) for g in groups.values()) == len(list(hybrid.parameters()))


def test_schedule_warms_up_then_decays_to_the_floor():
    recipe = Recipe(epochs=4, lr=1.0, warmup_epochs=1, min_lr_ratio=0.1)
    optimizer = recipe.build_optimizer(nn.Linear(2, 2))
    schedule = recipe.build_schedule(optimizer, steps_per_epoch=10)
    rates = []
    for _ in range(40):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[0] < rates[5] < rates[9] < rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[-1] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize(
    ("field", "value"), [("optimizer", "lamb"), ("epochs", 0), ("lr", -1.0), ("min_lr_ratio", 2.0)]
)
def test_bad_recipe_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Recipe(**{field: value})


def test_recipe_round_trips_and_rejects_unknown_fields():
    assert Recipe.from_dict(RECIPE.to_dict()) == RECIPE
    with pytest.raises(ValueError, match="unknown Recipe fields"):
        Recipe.from_dict({"lr": 0.1, "learning_rate": 0.1})


# --- data --------------------------------------------------------------------------------------------------


def test_splits_classes_and_balanced_subset(splits):
    train, evaluation = splits
    assert train.classes == evaluation.classes == sorted(COLOURS)
    assert len(train) == 72 and len(evaluation) == 24
    image, label = train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 0
    chosen = balanced_subset(train.targets, 5, seed=0)
    assert len(chosen) == 15 and chosen == balanced_subset(train.targets, 5, seed=0)
    assert sorted(torch.tensor(train.targets)[chosen].bincount().tolist()) == [5, 5, 5]
    with pytest.raises(ValueError, match="fewer than the 30"):
        balanced_subset(train.targets, 30, seed=0)


def test_tar_archive_is_extracted_once_into_the_cache(dataset, tmp_path):
    archive = tmp_path / "tiny.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(dataset, arcname="tiny")
    cache = tmp_path / "cache"
    root = extract(archive, cache)
    assert root == cache / "tiny" and find_splits(root)[0] == root / "tiny" / "train"
    marker = root / "marker"
    marker.write_text("kept")
    assert extract(archive, cache) == root and marker.exists()  # reused, not extracted again
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_missing_and_malformed_dataset_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_splits(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "image.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no train/ and val/"):
        find_splits(tmp_path / "flat")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not an ImageFolder"):
        ImageFolderData(tmp_path / "empty" / "train")


def test_corrupt_images_are_skipped_with_a_count_or_fail_naming_the_file(tmp_path):
    root = write_imagefolder(tmp_path / "data", {"train": 4, "val": 2})
    broken = root / "train" / "red" / "999.png"
    broken.write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        split = ImageFolderData(root / "train", in_memory=True)
    assert split.skipped == [str(broken)] and len(split) == 12
    streaming = ImageFolderData(root / "train")
    index = [p for p, _ in streaming.samples].index(str(broken))
    with pytest.raises(ValueError, match="999.png"):
        streaming[index]


def test_evaluation_split_with_other_classes_is_refused(tmp_path):
    root = write_imagefolder(tmp_path / "data", {"train": 2, "val": 2})
    (root / "val" / "violet").mkdir()
    (root / "val" / "red").rename(root / "val" / "violet" / "x")
    with pytest.raises(ValueError, match="unlike the training split"):
        load_splits(root, Preprocessing(16))


# --- the loop ----------------------------------------------------------------------------------------------


def test_finetune_learns_and_writes_checkpoints_and_metrics(splits, tmp_path):
    train, evaluation = splits
    hybrid = hybrid_of_tiny()
    result = finetune(hybrid, train, evaluation, RECIPE, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2] == [r["epoch"] for r in result.history]
    assert records[-1]["val_top1"] > records[0]["val_top1"] and records[-1]["val_top1"] >= 0.9
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["recipe"] == RECIPE.to_dict()
    gates = [m.gate for m in hybrid.modules() if isinstance(m, tcnn_fx.ConvAttention2d)]
    assert gates and all(g.abs().max() > 0 for g in gates)  # the content branch opened


def test_resume_after_a_crash_equals_the_uninterrupted_run(splits, tmp_path):
    train, evaluation = splits
    whole = finetune(hybrid_of_tiny(), train, evaluation, RECIPE, tmp_path / "whole", progress=False)
    first = finetune(hybrid_of_tiny(), train, evaluation, ONE_EPOCH,
                     tmp_path / "crashed", progress=False)  # fmt: skip
    assert len(first.history) == 2
    # A crash after epoch 1: the checkpoint of a 1-epoch recipe cannot be resumed under a 2-epoch one...
    with pytest.raises(ValueError, match="another recipe"):
        finetune(hybrid_of_tiny(), train, evaluation, RECIPE, tmp_path / "crashed", resume=True, progress=False)
    # ...so crash a real 2-epoch run: stop it after its first epoch by failing in the data.
    crashing = _CrashAfter(train, len(train) // RECIPE.batch_size * RECIPE.batch_size + 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(hybrid_of_tiny(), crashing, evaluation, RECIPE, tmp_path / "resumed", progress=False)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = finetune(hybrid_of_tiny(), train, evaluation, RECIPE, tmp_path / "resumed", resume=True, progress=False)
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert a["epoch"] == b["epoch"] and a["val_top1"] == b["val_top1"]
        assert a.keys() == b.keys()
        if a["epoch"]:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class _CrashAfter(torch.utils.data.Dataset):
    """``data`` that raises once ``limit`` samples have been read."""

    def __init__(self, data, limit):
        self.data, self.limit, self.reads = data, limit, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads > self.limit:
            raise RuntimeError("simulated crash")
        return self.data[index]


def test_existing_checkpoint_is_never_overwritten_and_other_models_are_refused(splits, tmp_path):
    train, evaluation = splits
    finetune(hybrid_of_tiny(), train, evaluation, ONE_EPOCH, tmp_path, progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        finetune(hybrid_of_tiny(), train, evaluation, RECIPE, tmp_path, progress=False)
    torch.manual_seed(0)
    other = TinyResNet(width=4, classes=3)
    with pytest.raises(ValueError, match="another model"):
        finetune(other, train, evaluation, ONE_EPOCH, tmp_path, resume=True,
                 progress=False)  # fmt: skip
    assert (tmp_path / "last.pt").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        finetune(hybrid_of_tiny(), train, evaluation, RECIPE, tmp_path / "fresh", resume=True, progress=False)


def test_divergence_stops_with_a_clear_error(splits):
    train, evaluation = splits
    with pytest.raises(FloatingPointError, match="diverged"):
        finetune(
            hybrid_of_tiny(), train, evaluation, Recipe(epochs=1, batch_size=8, lr=1e30, workers=0), progress=False
        )


def test_the_cnn_trains_with_the_same_loop(splits):
    train, evaluation = splits
    torch.manual_seed(0)
    cnn = TinyResNet(classes=3)
    result = finetune(cnn, train, evaluation, RECIPE, progress=False)
    assert result.final_top1 >= 0.9 and evaluate_accuracy(cnn, evaluation)["val_top1"] == result.final_top1


def test_torchrun_trains_on_two_processes(dataset, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch, tcnn_fx\n"
        f"sys.path.insert(0, {str(MODELS.parent)!r})\n"
        "from models import TinyResNet\n"
        "from tcnn_fx.training import Preprocessing, Recipe, finetune, load_splits\n"
        f"train, evaluation = load_splits({str(dataset)!r}, Preprocessing(16), in_memory=True)\n"
        "torch.manual_seed(0)\n"
        "model = tcnn_fx.rewrite(TinyResNet(classes=3).eval(), 'stage>=1', (torch.randn(1, 3, 16, 16),))\n"
        f"result = finetune(model, train, evaluation, Recipe(epochs=2, batch_size=4, lr=0.05, workers=0), {str(tmp_path / 'run')!r}, progress=False)\n"
        "print('FINAL', torch.distributed.get_rank(), result.final_top1, result.history[-1]['val_images'])\n"
    )  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    finals = sorted(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("FINAL"))
    assert [f[0] for f in finals] == ["0", "1"]
    assert finals[0][1:] == finals[1][1:] and finals[0][2] == "24"  # both ranks agree; every image counted once
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2] and float(finals[0][1]) == records[-1]["val_top1"]


# --- command line ------------------------------------------------------------------------------------------


def test_cli_finetune_evaluate_analyze(dataset, tmp_path, capsys):
    spec = f"{MODELS}:TinyResNet"
    common = ["--data", str(dataset), "--input-size", "16"]
    with pytest.raises(SystemExit):
        main(["finetune", spec, *common, "--out", str(tmp_path / "x"), "--epochs", "1"])
    message = capsys.readouterr().err
    assert "the model has 5 outputs but" in message and "pass --num-classes 3" in message
    assert not (tmp_path / "x").exists()  # refused before the run folder was made
    run = tmp_path / "run"
    main(["finetune", spec, *common, "--num-classes", "3", "--policy", "stage>=1", "--out", str(run), "--epochs", "2",
          "--batch-size", "8", "--lr", "0.05", "--workers", "0", "--quiet", "--in-memory"])  # fmt: skip
    assert {p.name for p in run.iterdir()} >= {"last.pt", "metrics.jsonl", "model.safetensors"}
    hybrid = tcnn_fx.load(run / "model.safetensors", trust_model_file=True)  # the spec is a Python file
    assert len(tcnn_fx.report_of(hybrid).converted) > 0
    capsys.readouterr()
    main(["evaluate", str(run / "model.safetensors"), "--trust-model-file", "--data", str(dataset), "--corruptions",
          "contrast,pixelate", "--severities", "1,5", "--json", str(tmp_path / "robust.json"), "--quiet"])  # fmt: skip
    robust = json.loads((tmp_path / "robust.json").read_text())
    assert set(robust["corrupted"]) == {"contrast", "pixelate"} and set(robust["corrupted"]["contrast"]) == {"1", "5"}
    assert robust["clean_top1"] == json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_top1"]
    main(["analyze", str(run / "model.safetensors"), "--trust-model-file", "--data", str(dataset), "--images", "12",
          "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")])  # fmt: skip
    layers = json.loads((tmp_path / "a.json").read_text())["layers"]
    assert [layer["name"] for layer in layers] == list(tcnn_fx.report_of(hybrid).converted)
    assert (tmp_path / "a.png").stat().st_size > 10_000
