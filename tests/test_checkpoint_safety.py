"""Checkpoints that are safe to receive: nothing executable, the recipe replayed whole, damage refused by name.

The threat model (docs/compiler.md, "Checkpoints"): a checkpoint may come
from someone else.  Loading must never run a Python file the checkpoint
names unless the caller opts in, and then only the file that was recorded.
"""

import json
import textwrap

import pytest
import torch
from torch import nn

import tcnn_fx
from tcnn_fx import checkpoint
from tcnn_fx.errors import CheckpointError, MissingFileError, TcnnFxError
from tcnn_fx.models import cifar_resnet

MODEL_FILE = """
from pathlib import Path
from torch import nn

Path({marker!r}).write_text("ran")  # what a malicious model file could do instead


def make(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
"""


@pytest.fixture
def file_spec_checkpoint(tmp_path):
    """A hybrid built from a Python file spec and saved; the file writes a marker whenever it runs."""
    marker, source = tmp_path / "marker", tmp_path / "net.py"
    source.write_text(textwrap.dedent(MODEL_FILE.format(marker=str(marker))))
    spec = f"{source}:make"
    model = tcnn_fx.specs.build(spec)
    hybrid = tcnn_fx.rewrite(model, tcnn_fx.Policy("all", include_stem=True), (torch.randn(1, 3, 8, 8),), spec=spec)
    path = tmp_path / "hybrid.safetensors"
    checkpoint.save(hybrid, path)
    marker.unlink()
    return path, source, marker, model, hybrid


def test_a_file_spec_never_runs_without_opting_in(file_spec_checkpoint):
    path, source, marker, model, hybrid = file_spec_checkpoint
    with pytest.raises(CheckpointError, match=f"names the Python file {source}.*trust_model_file=True"):
        tcnn_fx.load(path)
    assert not marker.exists()
    x = torch.randn(2, 3, 8, 8)
    given = tcnn_fx.load(path, model=model).eval()  # the base model given: the file is not needed
    assert not marker.exists()
    assert torch.equal(given(x), hybrid.eval()(x))
    trusted = tcnn_fx.load(path, trust_model_file=True).eval()
    assert marker.exists() and torch.equal(trusted(x), hybrid(x))


def test_a_changed_model_file_is_refused(file_spec_checkpoint):
    path, source, marker, *_ = file_spec_checkpoint
    source.write_text(source.read_text() + "\n# changed\n")
    with pytest.raises(CheckpointError, match="has changed since"):
        tcnn_fx.load(path, trust_model_file=True)
    assert not marker.exists()
    source.unlink()
    with pytest.raises(MissingFileError, match="does not exist"):
        tcnn_fx.load(path, trust_model_file=True)


def test_the_file_is_safetensors_with_the_recipe_as_json(file_spec_checkpoint):
    import safetensors

    path, source, *_ = file_spec_checkpoint
    with safetensors.safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    recipe = json.loads(metadata["tcnn_fx.recipe"])
    assert recipe["spec"] == f"{source}:make" and len(recipe["spec_sha256"]) == 64
    assert recipe["policy"]["select"] == "all" and recipe["input_shapes"] == [[1, 3, 8, 8]]


def test_the_given_base_model_is_not_changed(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    headed = tcnn_fx.specs.replace_head(cifar_resnet(20).eval(), 4)
    hybrid = tcnn_fx.rewrite(headed, "last", (torch.randn(1, 3, 32, 32),))
    checkpoint.save(hybrid, tmp_path / "h.safetensors", num_classes=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = tcnn_fx.load(tmp_path / "h.safetensors", model=model)
    assert loaded.get_submodule("linear").out_features == 4 and model.linear.out_features == 10
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_the_previous_format_still_loads(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    x = torch.randn(2, 3, 32, 32)
    hybrid = tcnn_fx.rewrite(model, "last", (x,), spec="cifar:resnet20")
    recipe = tcnn_fx.recipe_of(hybrid)
    legacy = {
        "format": "tcnn_fx/1", "spec": recipe.spec, "policy": recipe.policy, "config": recipe.config,
        "input_shape": list(recipe.input_shape), "input_shapes": [list(recipe.input_shape)], "module": None,
        "fold_norm": False, "num_classes": None, "conv_stem": None, "state_dict": hybrid.state_dict(),
    }  # fmt: skip
    torch.save(legacy, tmp_path / "old.pt")
    assert torch.equal(tcnn_fx.load(tmp_path / "old.pt").eval()(x), hybrid.eval()(x))
    assert checkpoint.read_recipe(tmp_path / "old.pt").spec == "cifar:resnet20"


def damaged(tmp_path, good):
    data = good.read_bytes()
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    other = tcnn_fx.rewrite(cifar_resnet(32).eval(), "last", (torch.randn(1, 3, 32, 32),), spec="cifar:resnet20")
    checkpoint.save(other, tmp_path / "other.safetensors")  # resnet32's weights under resnet20's spec
    files = {
        "truncated": data[: len(data) // 2],
        "header only": data[:200],
        "random bytes": bytes(range(256)) * 8,
        "empty": b"",
        "json": b'{"format": "tcnn_fx/2"}',
        "plain tensor file": (tmp_path / "tensor.pt").read_bytes(),
        "another model's": (tmp_path / "other.safetensors").read_bytes(),
        "zip of nothing": b"PK\x03\x04" + b"\x00" * 100,
    }
    for name, content in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        path.write_bytes(content)
        yield name, path


def test_damaged_and_foreign_files_are_refused_by_name(tmp_path):
    torch.manual_seed(0)
    hybrid = tcnn_fx.rewrite(cifar_resnet(20).eval(), "last", (torch.randn(1, 3, 32, 32),), spec="cifar:resnet20")
    good = tmp_path / "good.safetensors"
    checkpoint.save(hybrid, good)
    for name, path in damaged(tmp_path, good):
        with pytest.raises(CheckpointError) as error:
            tcnn_fx.load(path)
        message = str(error.value)
        assert str(path) in message and "\n" not in message, (name, message)
    with pytest.raises(MissingFileError, match="does not exist"):
        tcnn_fx.load(tmp_path / "absent.safetensors")


def test_a_failed_save_leaves_nothing(tmp_path):
    predicate = tcnn_fx.rewrite(cifar_resnet(20).eval(), lambda site: site.stage == 3, (torch.randn(1, 3, 32, 32),))
    with pytest.raises(TcnnFxError, match="predicate"):
        checkpoint.save(predicate, tmp_path / "p.safetensors")
    with pytest.raises(TcnnFxError, match="not produced by tcnn_fx.rewrite"):
        checkpoint.save(nn.Conv2d(1, 1, 1), tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []
