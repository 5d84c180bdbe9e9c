"""Attention analysis of a hybrid: gates closed and distances equal to the kernel taps' at conversion."""

import math

import pytest
import torch

import tcnn_fx
from tcnn_fx import analysis
from tcnn_fx.specs import load_model


def tap_distance(kernel: int, dilation: int = 1) -> float:
    offsets = [(i - kernel // 2) * dilation for i in range(kernel)]
    return sum(math.hypot(a, b) for a in offsets for b in offsets) / kernel**2


def test_at_conversion_gates_are_closed_and_heads_attend_to_their_taps(tmp_path):
    torch.manual_seed(0)
    model = load_model("cifar:resnet20").eval()
    images = torch.randn(6, 3, 32, 32)
    hybrid = tcnn_fx.rewrite(model, "last", (images[:1],))
    rows = analysis.analyze_attention(hybrid, images, chunk=4)
    assert [r.name for r in rows] == list(tcnn_fx.report_of(hybrid).converted)
    for row in rows:
        assert len(row.content_weight) == 9 and row.mean_content_weight == 0
        assert row.resolution == (8, 8)
        # Interior queries attend at the tap's distance; border taps that fall on zero padding carry no mass.
        assert row.positional_distance == pytest.approx(row.distance)
        assert row.mean_distance == pytest.approx(tap_distance(3), abs=0.02)
        assert min(row.distance) == pytest.approx(0, abs=1e-6)  # the centre tap
    assert hybrid.training is False
    analysis.plot(rows, tmp_path / "attention.png", title="at conversion")
    assert (tmp_path / "attention.png").stat().st_size > 10_000
    assert "layer3.0.conv1" in analysis.table(rows)


def test_opened_gates_and_content_reach_show(tmp_path):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    hybrid = torch.nn.Sequential(tcnn_fx.ConvAttention2d.from_conv(conv))
    with torch.no_grad():
        hybrid[0].gate.fill_(0.5)
    (row,) = analysis.analyze_attention(hybrid, torch.randn(3, 4, 10, 10))
    assert row.mean_content_weight == pytest.approx(0.5)
    assert row.content_distance[0] > row.positional_distance[0]  # content attention spreads over the image
    assert row.positional_distance[0] < row.distance[0] < row.content_distance[0]  # the applied mix lies between


def test_a_model_without_attention_is_refused():
    with pytest.raises(ValueError, match="no ConvAttention2d"):
        analysis.analyze_attention(torch.nn.Conv2d(3, 3, 3), torch.randn(1, 3, 8, 8))
