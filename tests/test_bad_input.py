"""Bad input at the API's entry points: every case is a TcnnFxError naming the culprit, and nothing is left behind.

(The command line's version of these cases is in test_cli.py; checkpoints in test_checkpoint_safety.py.)
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tcnn_fx
from tcnn_fx import Policy, specs
from tcnn_fx.errors import TcnnFxError
from tcnn_fx.export import to_onnx, verify_onnx
from tcnn_fx.models import cifar_resnet


def one_line_error(call, *culprits):
    """``call()`` raises a TcnnFxError whose one-line message names every culprit."""
    with pytest.raises(TcnnFxError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(str(c) in message for c in culprits), message
    return message


@settings(max_examples=60, deadline=None)
@given(source=st.sampled_from(["torchvision", "timm", "cifar", "caffe", "", "nowhere/x.py"]), name=st.text(max_size=12))
def test_malformed_specs(source, name):
    spec = f"{source}:{name}" if source else name
    try:
        model = specs.build(spec)
    except TcnnFxError as error:
        assert "\n" not in str(error)
        return
    assert isinstance(model, torch.nn.Module)  # a random name can be a real model ('cifar:resnet8' ...)


@pytest.mark.parametrize("content", [b"", b"not a pickle", b"PK\x03\x04" + bytes(50), bytes(range(256))])
def test_weights_files_that_are_not_state_dicts(tmp_path, content):
    path = tmp_path / "weights.th"
    path.write_bytes(content)
    one_line_error(lambda: specs.load_weights(cifar_resnet(20), path), path)
    one_line_error(lambda: specs.load_weights(cifar_resnet(20), tmp_path / "absent.th"), "absent.th")


@pytest.mark.parametrize(
    ("suffix", "content"),
    [(".json", "{not json"), (".yaml", "- a\n- list\n"), (".json", '{"select": 4}'), (".yaml", "select: [1, 2"),
     (".json", '{"select": "all", "max_flop_ratio": "x"}'), (".json", '{"sites": "layer1"}')],
)  # fmt: skip
def test_policy_files_that_do_not_parse(tmp_path, suffix, content):
    path = tmp_path / f"policy{suffix}"
    path.write_text(content)
    one_line_error(lambda: Policy.load(path), path)


def test_bad_rewrite_arguments(tmp_path):
    model = cifar_resnet(20).eval()
    x = torch.randn(1, 3, 32, 32)
    one_line_error(lambda: tcnn_fx.rewrite(model, "last", x), "tuple")
    one_line_error(lambda: tcnn_fx.rewrite(model, "last", (torch.randn(1, 5, 32, 32),)), "conv1")
    one_line_error(lambda: tcnn_fx.rewrite(model, "stage9", (x,)), "stage9")
    one_line_error(lambda: tcnn_fx.rewrite(model, "last", (x,), module="layer9"), "layer9")
    one_line_error(lambda: tcnn_fx.rewrite(model, "last", (x,), gate_typo=1), "gate_typo")
    one_line_error(lambda: tcnn_fx.rewrite(model, 42, (x,)), "int")
    one_line_error(lambda: tcnn_fx.verify(model, model, (x,)), "not produced by tcnn_fx.rewrite")


def test_onnx_files_that_are_not_the_models(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    x = torch.randn(2, 3, 32, 32)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07garbage" * 10)
    one_line_error(lambda: verify_onnx(model, garbage, (x,)), garbage)
    one_line_error(lambda: verify_onnx(model, tmp_path / "absent.onnx", (x,)), "absent.onnx")
    other = to_onnx(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), tmp_path / "other.onnx", (x,))
    one_line_error(lambda: verify_onnx(model, other, (x,)), other)
    before = set(tmp_path.iterdir())
    one_line_error(lambda: to_onnx(model, tmp_path / "missing" / "m.onnx", (x,)), tmp_path / "missing")
    one_line_error(lambda: to_onnx(model, tmp_path / "m.onnx", (x,), opset=3), "opset")
    assert set(tmp_path.iterdir()) == before
