"""Capture: tracing with registries, fallback leaves, train/eval agreement, bad input."""

import operator

import pytest
import torch
from torch import nn

import tcnn_fx
from models import TinyResNet, WithUntraceable
from tcnn_fx.capture import CaptureError, capture


def test_captured_graph_computes_the_model():
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    graph_module = capture(model, (x,))
    assert torch.equal(graph_module(x), model(x))
    assert graph_module.meta["tcnn_fx.capture"].fallback_leaves == {}


def test_untraceable_submodule_becomes_a_leaf_and_is_reported():
    model = WithUntraceable().eval()
    x = torch.randn(1, 3, 8, 8)
    graph_module = capture(model, (x,))
    info = graph_module.meta["tcnn_fx.capture"]
    assert list(info.fallback_leaves) == ["inner"]
    assert "TraceError" in info.fallback_leaves["inner"] or "control flow" in info.fallback_leaves["inner"]
    assert torch.equal(graph_module(x), model(x))


def test_untraceable_top_level_is_an_error_naming_the_model():
    class Bad(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(CaptureError, match="Bad.forward itself"):
        capture(Bad(), (torch.randn(1, 3, 4, 4),))


def test_mode_dependent_modules_are_kept_whole():
    class DropPath(nn.Module):
        def forward(self, x):
            if not self.training:
                return x
            return x * (torch.rand_like(x[:, :1, :1, :1]) > 0.5)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.drop = nn.Conv2d(3, 3, 3, padding=1), DropPath()

        def forward(self, x):
            return x + self.drop(self.conv(x))

    model = Net().train()
    graph_module = capture(model, (torch.randn(2, 3, 8, 8),))
    assert graph_module.meta["tcnn_fx.capture"].mode_leaves == ("drop",)
    assert model.training and model.drop.training  # modes restored
    x = torch.randn(2, 3, 8, 8)
    graph_module.eval(), model.eval()
    assert torch.equal(graph_module(x), model(x))


def test_non_tensor_inputs_are_refused():
    with pytest.raises(TypeError, match="must take tensors only"):
        capture(TinyResNet(), (torch.randn(1, 3, 8, 8), "mode"))
    with pytest.raises(TypeError, match="non-empty tuple"):
        capture(TinyResNet(), torch.randn(1, 3, 8, 8))


def test_unknown_leaf_name():
    with pytest.raises(ValueError, match="not submodules"):
        capture(TinyResNet(), (torch.randn(1, 3, 8, 8),), leaf_modules=["nope"])


def test_wrong_input_shape_names_the_module():
    with pytest.raises(Exception, match="module 'stem'"):
        tcnn_fx.trace(TinyResNet(), (torch.randn(1, 4, 16, 16),))


@pytest.mark.parametrize(
    ("model", "x", "message"),
    [
        (
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(6)),
            torch.randn(1, 3, 8, 8),
            "BatchNorm2d\\(6\\) got an input with 8",
        ),
        (nn.Sequential(nn.Flatten(), nn.BatchNorm2d(3)), torch.randn(1, 3, 8, 8), "expected 4D input"),
    ],
)
def test_batch_norm_that_does_not_fit_its_input_names_the_module(model, x, message):
    # Shape propagation answers batch norms without running them; their checks must still hold.
    with pytest.raises(Exception, match="module '1'") as error:
        tcnn_fx.trace(model, (x,))
    assert error.match(message)


def test_timm_same_padding_convolution_is_traced_through():
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_b0", num_classes=10).eval()
    graph_module = tcnn_fx.trace(model, (torch.randn(1, 3, 64, 64),))
    stem = next(s for s in graph_module.meta["tcnn_fx.sites"] if s.name == "conv_stem")
    # TensorFlow 'same' at stride 2 pads by amounts that depend on the input size: the pad stays in the graph
    # in front of the site (which sees the padded 65x65 input), so a hybrid pads right at every size.
    assert stem.kind == "functional" and stem.convertible and stem.pad_node is None
    assert stem.geometry.padding == (0, 0, 0, 0) and stem.input_size == (65, 65) and stem.output_size == (32, 32)


class AugmentedAssignments(nn.Module):
    """A residual block updated in place, and an alias that sees the update (as eager code does)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        out = self.conv(x)
        alias = out
        out += x
        out *= 0.5
        return torch.cat([alias, out])


def test_augmented_assignments_stay_in_place():
    # fx traces `out += x` as an out-of-place add: the alias would keep the convolution's output.
    torchvision = pytest.importorskip("torchvision")
    model = AugmentedAssignments().eval()
    x = torch.randn(2, 4, 6, 6)
    graph_module = capture(model, (x,))
    targets = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
    assert operator.iadd in targets and operator.imul in targets and operator.add not in targets
    with torch.no_grad():
        assert torch.equal(graph_module(x), model(x))
    resnet = capture(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    assert sum(node.target is operator.iadd for node in resnet.graph.nodes) == 8  # one per BasicBlock
