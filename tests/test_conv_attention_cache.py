"""Positional attention is computed once per input size while nothing it depends on changes."""

import torch
from torch import nn

from tcnn_fx import ConvAttention2d


def make_layer():
    torch.manual_seed(0)
    return ConvAttention2d.from_conv(nn.Conv2d(3, 5, 3, padding=1)).eval()


def test_inference_reuses_positional_attention():
    layer = make_layer()
    with torch.no_grad():
        first = layer._positional(8, 8, torch.float32)
        assert layer._positional(8, 8, torch.float32) is first
        assert layer._positional(8, 9, torch.float32) is not first  # another size, another map


def test_training_recomputes_with_gradient():
    layer = make_layer().train()
    maps = layer._positional(8, 8, torch.float32)
    assert maps.requires_grad
    assert layer._positional(8, 8, torch.float32) is not maps


def test_cache_follows_in_place_parameter_updates():
    layer = make_layer()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        layer(x)  # fills the cache
        layer.centres.add_(0.4)
        layer.locality.fill_(1.5)
        layer.gate.fill_(0.3)  # the mix's positional term, (1 - w) P, is cached too
        layer.query_weight.mul_(2)  # and the stacked query and key weights
        cached = layer(x)
    fresh = make_layer()
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(cached, fresh(x))  # an empty cache: computed from scratch


def test_cache_follows_dtype_moves_and_loaded_state():
    layer = make_layer()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        layer(x)
        layer.double()
        out = layer(x.double())
    assert out.dtype == torch.float64
    other = make_layer()
    with torch.no_grad():
        other.centres.mul_(-1)
        layer.float()(x)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))


def test_cache_follows_the_gate_alone():
    layer = make_layer()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        layer(x)  # caches (1 - w) P with w = 0
        layer.gate.fill_(0.3)
        cached = layer(x)
    fresh = make_layer()
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(cached, fresh(x))
