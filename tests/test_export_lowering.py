"""Per-layer ONNX lowering (tcnn_fx.export.lowering) and files that run at any batch and resolution."""

import json
import warnings

import onnx
import pytest
import torch
from models import TinyResNet
from torch import nn

import tcnn_fx
from tcnn_fx.errors import InvalidInputError
from tcnn_fx.export import to_onnx, verify_onnx
from tcnn_fx.export.bench import with_content_weight
from tcnn_fx.export.lowering import LayerLowering, LoweredConvAttention, Lowering, choose, tap_targets
from tcnn_fx.layers.conv_attention import ConvAttention2d

GEOMETRIES = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": 3, "padding": 2, "dilation": 2, "groups": 2},
    {"kernel_size": 2, "padding": (0, 1, 1, 0)},  # even kernel, asymmetric padding
    {"kernel_size": (3, 1), "padding": (1, 0), "padding_mode": "reflect"},
    {"kernel_size": 3, "stride": 2, "padding": 1, "padding_mode": "circular"},
    {"kernel_size": 3, "padding": 1, "groups": 8},  # depthwise
]


def _layer(geometry: dict, open_heads: int, seed: int = 0) -> ConvAttention2d:
    torch.manual_seed(seed)
    layer = ConvAttention2d.from_conv(nn.Conv2d(8, 8, **geometry)).eval()
    with torch.no_grad():
        weights = torch.rand(layer.num_heads) * 0.5
        weights[torch.randperm(layer.num_heads)[open_heads:]] = 0.0
        layer.gate.copy_(weights)
    return layer


def test_fresh_layers_map_every_head_to_its_own_tap():
    for geometry in GEOMETRIES:
        layer = _layer(geometry, 0)
        targets, why = tap_targets(layer)
        assert targets == tuple(range(layer.num_heads)), (geometry, why)


def test_soft_or_displaced_maps_are_not_taps():
    layer = _layer({"kernel_size": 3, "padding": 1}, 0)
    with torch.no_grad():
        layer.locality.fill_(1.0)  # ConViT's locality: soft maps
    assert tap_targets(layer) == (None, pytest.approx(tap_targets(layer)[1]))
    assert "not one-hot" in tap_targets(layer)[1]
    layer = _layer({"kernel_size": 3, "padding": 1}, 0)
    with torch.no_grad():
        layer.centres[0] += torch.tensor([1.0, 1.0])  # head 0 moves from tap (-1, -1) onto tap (0, 0) = 4
    assert tap_targets(layer)[0] == (4, 1, 2, 3, 4, 5, 6, 7, 8)
    with torch.no_grad():
        layer.centres[8] += torch.tensor([1.0, 0.0])  # head 8 leaves the kernel: its key may not exist at the border
    targets, why = tap_targets(layer)
    assert targets is None and "head 8" in why and "not on a kernel tap" in why
    with torch.no_grad():
        layer.centres[8] -= torch.tensor([1.5, 0.0])  # half way between two taps: two equal peaks
    assert "head 8's positional map is not one-hot" in tap_targets(layer)[1]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_every_lowering_computes_the_layer(geometry):
    """In PyTorch, at sizes other than any example, odd and non-square ones included."""
    for heads in (0, 2, 9):
        layer = _layer(geometry, heads, seed=heads)
        choices = [("taps", "none"), ("maps", "none")] if heads == 0 else []
        choices += [
            (p, c) for p in ("taps", "maps") for c in ("matmul", "attention") if heads and (p, c) != ("maps", "matmul")
        ]
        for positional, content in choices:
            heads_open = tuple(int(h) for h in torch.nonzero(layer.gate))
            targets = tap_targets(layer)[0] if positional == "taps" else None
            lowered = LoweredConvAttention(layer, LayerLowering(positional, content, heads_open, "test", targets))
            for size in ((9, 9), (12, 7), (5, 16)):
                x = torch.randn(2, 8, *size)
                with torch.no_grad():
                    expected, actual = layer(x), lowered(x)
                scale = expected.abs().max()
                assert (actual - expected).abs().max() <= 1e-5 * scale, (geometry, heads, positional, content, size)


def test_a_layer_as_converted_is_its_convolution_bit_for_bit():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = ConvAttention2d.from_conv(conv).eval()
    choice = choose(layer, (12, 12), Lowering(), 18, "conv")
    assert (choice.positional, choice.content) == ("taps", "none")
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        assert torch.equal(LoweredConvAttention(layer, choice)(x), conv(x))


def test_choices_follow_the_options_and_refuse_what_is_not_exact():
    layer = _layer({"kernel_size": 3, "padding": 1}, 9)
    assert choose(layer, (8, 8), Lowering(content="attention"), 23, "l").content == "attention"
    assert choose(layer, (8, 8), Lowering(positional="maps", content="matmul"), 18, "l").is_own_graph
    with torch.no_grad():
        layer.locality.fill_(1.0)
    with pytest.raises(InvalidInputError, match="positional='taps' is not exact for layer 'l'.*not one-hot"):
        choose(layer, (8, 8), Lowering(positional="taps"), 18, "l")
    assert choose(layer, (8, 8), Lowering(), 18, "l").positional == "maps"
    with pytest.raises(InvalidInputError, match="lowering target 'tpu' is not one of"):
        Lowering(target="tpu")


def test_the_cost_model_prefers_fused_attention_on_a_gpu_and_a_conv_for_closed_gates():
    layer = _layer({"kernel_size": 3, "padding": 1}, 9)
    gpu = choose(layer, (28, 28), Lowering(target="gpu"), 23, "l")
    assert (gpu.positional, gpu.content) == ("taps", "attention")
    assert choose(layer, (28, 28), Lowering(), 18, "l").content == "matmul"  # the only content graph at opset 18
    assert choose(_layer({"kernel_size": 3, "padding": 1}, 0), (28, 28), Lowering(), 23, "l").content == "none"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    hybrid = tcnn_fx.rewrite(model, "all", (torch.randn(2, 3, 16, 16),))
    return model, hybrid


def _metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _ops(path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


SIZES = ((1, 3, 16, 16), (3, 3, 24, 20), (2, 3, 13, 31), (1, 3, 40, 40))


def test_a_hybrid_as_converted_exports_as_its_cnn_at_any_size(tiny, tmp_path):
    model, hybrid = tiny
    path = to_onnx(hybrid, tmp_path / "h.onnx", (torch.randn(1, 3, 16, 16),))
    cnn = to_onnx(model, tmp_path / "c.onnx", (torch.randn(1, 3, 16, 16),))
    assert sorted(_ops(path)) == sorted(_ops(cnn))  # no Softmax, no MatMul: the content branch adds nothing
    lowering = json.loads(_metadata(path)["lowering"])
    assert {(v["positional"], v["content"]) for k, v in lowering.items() if k != "options"} == {("taps", "none")}
    assert json.loads(_metadata(path)["dynamic_axes"])["x"] == {"0": "batch", "2": "height", "3": "width"}
    for shape in SIZES:
        (check,) = verify_onnx(hybrid, path, (torch.randn(*shape),))
        assert check.outputs[0].max_rel <= 1e-5


@pytest.mark.parametrize(
    ("lowering", "opset", "op"),
    [(Lowering(), 18, "MatMul"), (Lowering(positional="maps", content="matmul"), 18, "MatMul"),
     (Lowering(content="attention"), 23, "Attention")],
    ids=["auto", "own-graph", "attention"],
)  # fmt: skip
def test_open_gates_export_at_any_size(tiny, tmp_path, lowering, opset, op):
    _, hybrid = tiny
    opened = with_content_weight(hybrid, 0.3)
    path = to_onnx(opened, tmp_path / "h.onnx", (torch.randn(2, 3, 16, 16),), lowering=lowering, opset=opset)
    assert op in _ops(path)
    for shape in SIZES[1:3]:  # another batch, non-square, odd
        (check,) = verify_onnx(opened, path, (torch.randn(*shape),))
        assert check.outputs[0].max_rel <= 1e-5


def test_fixed_resolution_folds_the_maps_and_refuses_other_sizes(tiny, tmp_path):
    _, hybrid = tiny
    opened = with_content_weight(hybrid, 0.3)
    lowering = Lowering(positional="maps", content="matmul")
    path = to_onnx(opened, tmp_path / "h.onnx", (torch.randn(2, 3, 16, 16),), lowering=lowering,
                   dynamic_resolution=False)  # fmt: skip
    assert "Range" not in _ops(path)  # the maps are constants
    assert json.loads(_metadata(path)["dynamic_axes"])["x"] == {"0": "batch"}
    assert verify_onnx(opened, path, (torch.randn(5, 3, 16, 16),))[0].passed
    with pytest.raises(InvalidInputError, match="does not run on inputs of shapes"):
        verify_onnx(opened, path, (torch.randn(1, 3, 24, 24),))


def test_attention_needs_opset_23(tiny, tmp_path):
    _, hybrid = tiny
    with pytest.raises(InvalidInputError, match="content='attention' needs the ONNX Attention op, opset >= 23"):
        to_onnx(hybrid, tmp_path / "h.onnx", (torch.randn(2, 3, 16, 16),), lowering=Lowering(content="attention"))
    assert list(tmp_path.iterdir()) == []


def test_sizes_the_model_fixes_are_named(tmp_path):
    class Flatten(nn.Module):  # a linear layer on the flattened map: one resolution only
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.head(self.conv(x).flatten(1))

    with pytest.warns(UserWarning, match=r"ties its input sizes to .*== 256.*size_conditions"):
        path = to_onnx(Flatten().eval(), tmp_path / "f.onnx", (torch.randn(2, 3, 8, 8),))
    assert any("== 256" in c for c in json.loads(_metadata(path)["size_conditions"]))


def test_a_detection_backbone_serves_every_size(tmp_path):
    """An FPN over a ResNet-18 (torchvision's detection backbone), its last stage converted and trained open."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    class Maps(nn.Module):  # the FPN's levels as a tuple (ONNX outputs)
        def __init__(self):
            super().__init__()
            self.fpn = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)

        def forward(self, x):
            return tuple(self.fpn(x).values())

    torch.manual_seed(0)
    model = Maps().eval()
    hybrid = with_content_weight(tcnn_fx.rewrite(model, "stage4", (torch.randn(1, 3, 64, 96),)), 0.2)
    # Exported where no level is 1x1 (at 64 pixels the pooled level is, and export would pin it: a warning).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = to_onnx(hybrid, tmp_path / "fpn.onnx", (torch.randn(1, 3, 128, 96),))
    assert not [w for w in caught if "ties its input sizes" in str(w.message)]
    for shape in ((2, 3, 96, 128), (1, 3, 200, 72)):
        (check,) = verify_onnx(hybrid, path, (torch.randn(*shape),))
        assert len(check.outputs) == 5 and all(c.max_rel <= 1e-5 for c in check.outputs)


def test_a_width_the_model_needs_is_named(tmp_path):
    class Pinned(nn.Module):  # adds a row of the example's width: export fixes it
        def forward(self, x):
            return (x + torch.arange(8.0)).mean((2, 3))

    with pytest.warns(UserWarning, match=r"ties its input sizes to .*size\(\)\[3\] == 8"):
        path = to_onnx(Pinned().eval(), tmp_path / "p.onnx", (torch.randn(2, 3, 8, 8),))
    assert json.loads(_metadata(path)["dynamic_axes"])["x"] == {"0": "batch", "2": "height", "3": "width"}


def test_a_runtime_without_an_op_is_named(tmp_path):
    from onnx import helper

    node = helper.make_node("Attention", ["x", "x", "x"], ["y"], domain="tcnn_fx.missing")
    value = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 3, 4])
    graph = helper.make_graph([node], "g", [value], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tcnn_fx.missing", 1)]
    )
    model.ir_version = 10
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(RuntimeError, match=r"ONNX Runtime .* cannot run .*m.onnx on CPUExecutionProvider.*Attention"):
        verify_onnx(nn.Identity(), tmp_path / "m.onnx", (torch.randn(1, 2, 3, 4),))


def test_a_model_that_needs_concrete_sizes_exports_at_the_example_size(tmp_path):
    class Concrete(nn.Module):  # the width as a Python int: no symbolic width can pass through it
        def forward(self, x):
            return x[..., : int(x.shape[-1]) // 2 * 2].mean((2, 3)) + float(x.shape[-1] > 7)

    with pytest.warns(UserWarning, match=r"Concrete exports with a fixed height and width only .*\(8, 8\)"):
        path = to_onnx(Concrete().eval(), tmp_path / "c.onnx", (torch.randn(2, 3, 8, 8),))
    assert json.loads(_metadata(path)["dynamic_axes"])["x"] == {"0": "batch"}
    assert verify_onnx(Concrete().eval(), path, (torch.randn(4, 3, 8, 8),))[0].passed
