"""Attention analysis of a hybrid: gates closed and distances equal to the kernel taps' at conversion; plots that
show all their data, never a signed mix as a distance, titled by model and policy rather than by a path."""

import json
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
    figure = analysis.plot(rows, tmp_path / "attention.png", model="cifar:resnet20", policy="last", images=6)
    assert (tmp_path / "attention.png").stat().st_size > 10_000
    assert figure._suptitle.get_text() == "cifar:resnet20, policy last: attention of the converted layers on 6 images"
    gates, distances = figure.axes
    low, high = gates.get_ylim()
    assert low < 0 < high  # every weight is 0: the axis still spans it
    assert "applied mix: mean" in legend(distances)  # every w in [0, 1]: the mix is a distance, and is drawn
    text = analysis.table(rows)
    assert "layer3.0.conv1" in text and f"{rows[0].mean_distance:.3f}" in text and "signed mass" not in text


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
    assert row.mix_is_distance
    with torch.no_grad():
        hybrid[0].gate.fill_(-0.5)
    (row,) = analysis.analyze_attention(hybrid, torch.randn(3, 4, 10, 10))
    # Subtracting content attention: the applied map's mass is signed and its "distance" leaves the branches' range.
    assert not row.mix_is_distance
    assert row.distance[0] < row.positional_distance[0] < row.content_distance[0]


def test_a_model_without_attention_is_refused():
    with pytest.raises(ValueError, match="no ConvAttention2d"):
        analysis.analyze_attention(torch.nn.Conv2d(3, 3, 3), torch.randn(1, 3, 8, 8))


def plotted(axis) -> list[float]:
    """Every y value drawn in ``axis``: scatter points and line vertices."""
    values = [y for collection in axis.collections for y in collection.get_offsets()[:, 1]]
    return values + [y for line in axis.lines for y in line.get_ydata()]


def legend(axis) -> list[str]:
    return [text.get_text() for text in axis.get_legend().get_texts()]


def fine_tuned_rows() -> list[analysis.LayerAttention]:
    """Like the fine-tuned CIFAR ResNet-20: weights near 0, one layer's far below, signed mixes."""
    rows = []
    for i in range(3):
        weights = [0.004 * (h - 4) + 0.001 - (0.41 if i == 2 else 0) for h in range(9)]
        positional = [0.5 + 0.1 * h for h in range(9)]
        content = [3.5 + 0.2 * h + i for h in range(9)]
        mix = [(1 - w) * p + w * c for w, p, c in zip(weights, positional, content, strict=True)]
        rows.append(analysis.LayerAttention(f"layer3.{i}.conv2", (8, 8), weights, mix, positional, content))
    return rows


def test_plot_with_negative_weights_shows_every_point_and_never_the_signed_mix(tmp_path):
    rows = fine_tuned_rows()
    assert min(rows[2].distance) < 0  # the signed mix of the most negative heads is "negative distance"
    figure = analysis.plot(rows, tmp_path / "a.png", title="/work/runs/resnet20-hybrid-seed0/model.pt on 250 images")
    assert (tmp_path / "a.png").stat().st_size > 10_000
    gates, distances = figure.axes
    for axis in (gates, distances):
        low, high = axis.get_ylim()
        assert all(low < y < high for y in plotted(axis)), axis.get_title()
    weights = [w for r in rows for w in r.content_weight]
    assert set(weights) <= set(plotted(gates)) and min(weights) < -0.4
    branches = [d for r in rows for d in (*r.positional_distance, *r.content_distance)]
    assert set(branches) <= set(plotted(distances))
    assert not set(plotted(distances)) & {d for r in rows for d in r.distance}
    assert not set(plotted(distances)) & {r.mean_distance for r in rows}
    assert min(plotted(distances)) >= 0
    assert not any("applied" in label for label in legend(distances))
    assert "signed" in figure.texts[-1].get_text()  # the caption says why the mix is not drawn
    assert figure._suptitle.get_text() == "resnet20-hybrid-seed0 on 250 images"
    text = analysis.table(rows)
    assert f"{rows[2].mean_distance:.3f}" not in text and "signed mass" in text
    assert [analysis.LayerAttention.from_dict(json.loads(json.dumps(r.to_dict()))) for r in rows] == rows


def test_titles_name_model_and_policy_never_a_path(tmp_path):
    policy = {"select": "last", "sites": []}
    assert analysis.figure_title("cifar:resnet20", policy, 250) == (
        "cifar:resnet20, policy last: attention of the converted layers on 250 images"
    )
    assert analysis.figure_title("/home/me/tests/models.py:TinyResNet", "stage>=1") == (
        "models.py:TinyResNet, policy stage>=1: attention of the converted layers"
    )
    sites = {"select": "", "sites": ["layer3.0.conv1", "layer3.0.conv2"]}
    assert "policy layer3.0.conv1, layer3.0.conv2" in analysis.figure_title("cifar:resnet20", sites)
    checkpoint = "/work/runs/cifar10/finetune/resnet56-hybrid-seed0/model.pt"  # a model known only by its file
    assert analysis.figure_title(checkpoint).startswith("resnet56-hybrid-seed0: ")
    figure = analysis.plot(fine_tuned_rows(), tmp_path / "t.png", title="runs/a/b/hybrid.pt on 8 images")
    assert figure._suptitle.get_text() == "hybrid on 8 images"
