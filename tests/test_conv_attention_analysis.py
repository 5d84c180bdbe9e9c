"""Attention maps, gates and head centres exposed for analysis."""

import math

import pytest
import torch
from torch import nn

from tcnn_fx import ConvAttention2d, ConvAttentionConfig, ConvGeometry


def test_head_centres_are_the_kernel_taps():
    conv = nn.Conv2d(2, 2, (3, 4), dilation=(2, 1), padding="same")
    layer = ConvAttention2d.from_conv(conv)
    expected = torch.tensor(ConvGeometry.of(conv).tap_offsets())
    assert torch.equal(layer.centres.detach(), expected)
    assert expected[0].tolist() == [-2.0, -1.5]  # top-left tap, from the centre of an even kernel
    assert layer.num_heads == 12


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_positional_maps_are_one_hot_on_each_tap(padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode=padding_mode).double()
    layer = ConvAttention2d.from_conv(conv)
    x = torch.randn(1, 3, 9, 8, dtype=torch.float64)
    maps = layer.attention(x)
    out_h, out_w = maps.output_size
    key_h, key_w = maps.key_size
    assert (out_h, out_w) == (5, 4)
    assert (key_h, key_w) == ((9, 8) if padding_mode == "zeros" else (11, 10))
    for head, (dy, dx) in enumerate(ConvGeometry.of(conv).tap_offsets()):
        for query in range(out_h * out_w):
            i, j = divmod(query, out_w)
            row, col = 2 * i + 1 + dy, 2 * j + 1 + dx  # padded coordinates of the tap
            if padding_mode == "zeros":
                row, col = row - 1, col - 1
                if not (0 <= row < key_h and 0 <= col < key_w):
                    assert maps.positional[head, query].sum() < 1e-15  # the tap reads zero padding
                    continue
            target = int(row * key_w + col)
            assert maps.positional[head, query, target] == pytest.approx(1.0, abs=1e-15)
            assert maps.positional[head, query].sum() == pytest.approx(1.0, abs=1e-15)
    assert torch.equal(maps.combined, maps.positional.unsqueeze(0).expand_as(maps.combined))
    assert maps.content.shape == maps.combined.shape
    assert torch.allclose(maps.content.sum(-1), torch.ones(1, 9, out_h * out_w, dtype=torch.float64))


def test_mean_distance_at_init_is_the_tap_distance():
    layer = ConvAttention2d.from_conv(nn.Conv2d(2, 2, 3, padding=1, dilation=1))
    distances = layer.attention(torch.randn(2, 2, 12, 12)).mean_distance()
    expected = torch.tensor([math.hypot(dy, dx) for dy, dx in layer.geometry.tap_offsets()])
    assert torch.allclose(distances, expected, atol=1e-5)


def test_mean_distance_grows_when_content_attention_takes_over():
    torch.manual_seed(0)
    layer = ConvAttention2d.from_conv(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 4, 12, 12)
    local = layer.attention(x).mean_distance()
    with torch.no_grad():
        layer.gate.fill_(1.0)
    maps = layer.attention(x)
    assert torch.equal(maps.content_weight, torch.ones(9))
    assert (maps.mean_distance() > local + 2).all()


def test_convit_preset_mixes_content_and_soft_positional_attention():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = ConvAttention2d.from_conv(conv, ConvAttentionConfig.convit())
    assert not layer.config.is_exact and ConvAttentionConfig().is_exact
    assert torch.allclose(layer.content_weight(), torch.full((9,), 1 - torch.sigmoid(torch.tensor(1.0)).item()))
    x = torch.randn(2, 4, 8, 8)
    maps = layer.attention(x)
    assert maps.positional.max() < 0.5  # locality 1: soft maps
    with torch.no_grad():
        error = ((layer(x) - conv(x)).abs().max() / conv(x).abs().max()).item()
    assert error > 0.1  # not the convolution, as documented
