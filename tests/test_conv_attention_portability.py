"""Serialisation, copies, dtype moves, tracing and compilation."""

import copy
import io

import pytest
import torch
from strategies import relative_error
from torch import nn

from tcnn_fx import ConvAttention2d, ConvAttentionConfig


@pytest.fixture
def conv():
    torch.manual_seed(0)
    return nn.Conv2d(4, 6, 3, stride=(1, 2), padding=1, padding_mode="reflect")


@pytest.fixture
def trained(conv):
    """A layer whose attention parameters have moved away from their initial values."""
    layer = ConvAttention2d.from_conv(conv)
    with torch.no_grad():
        layer.gate.uniform_(0.1, 0.5)
        layer.centres.add_(torch.rand_like(layer.centres) * 0.3)
        layer.locality.fill_(2.0)
    return layer


def test_state_dict_round_trip(trained):
    fresh = ConvAttention2d(4, 6, 3, stride=(1, 2), padding=1, padding_mode="reflect")
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(fresh(x), trained(x))
    assert set(trained.state_dict()) == {"weight", "bias", "query_weight", "key_weight", "centres", "locality", "gate"}


def test_save_and_load_with_weights_only(trained):
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = ConvAttention2d(4, 6, 3, stride=(1, 2), padding=1, padding_mode="reflect")
    fresh.load_state_dict(state)
    x = torch.randn(1, 4, 7, 8)
    assert torch.equal(fresh(x), trained(x))


def test_deepcopy_is_independent(trained):
    clone = copy.deepcopy(trained)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(clone(x), trained(x))
    with torch.no_grad():
        clone.gate.zero_()
    assert not torch.equal(clone(x), trained(x))


def test_config_round_trips_through_a_dict():
    config = ConvAttentionConfig.convit(locality_strength=2.0, qk_dim=4)
    assert ConvAttentionConfig.from_dict(config.to_dict()) == config


def test_double_matches_double_convolution(conv):
    layer = ConvAttention2d.from_conv(conv).double()
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    assert relative_error(layer(x), conv.double()(x)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_close_to_the_convolution(conv, dtype):
    layer = ConvAttention2d.from_conv(conv)
    x = torch.randn(2, 4, 9, 9)
    expected = conv(x)
    out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert relative_error(out.float(), expected) <= 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(conv, trained):
    x = torch.randn(2, 4, 9, 9)
    assert relative_error(ConvAttention2d.from_conv(conv).cuda()(x.cuda()).cpu(), conv(x)) <= 1e-5
    assert relative_error(copy.deepcopy(trained).cuda()(x.cuda()).cpu(), trained(x)) <= 1e-5


class _Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer, self.norm = layer, nn.BatchNorm2d(layer.out_channels)

    def forward(self, x):
        return torch.relu(self.norm(self.layer(x))) + x.mean()


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, ConvAttention2d) or super().is_leaf_module(m, qualname)


def test_fx_traces_the_layer_as_a_leaf(trained):
    block = _Block(trained).eval()
    graph = _LeafTracer().trace(block)
    module = torch.fx.GraphModule(block, graph)
    targets = [n.target for n in graph.nodes if n.op == "call_module"]
    assert "layer" in targets
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(module(x), block(x))


def test_export_captures_plain_ops(trained):
    x = torch.randn(2, 4, 9, 9)
    exported = torch.export.export(trained.eval(), (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("bmm" in op for op in ops) and any("softmax" in op for op in ops)
    assert relative_error(exported.module()(x), trained(x)) <= 1e-6


def test_torch_compile_matches_eager(trained):
    compiled = torch.compile(trained)
    x = torch.randn(2, 4, 9, 9)
    assert relative_error(compiled(x), trained(x)) <= 1e-5
    with torch.no_grad():
        assert relative_error(compiled(x), trained(x)) <= 1e-5
