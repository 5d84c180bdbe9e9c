"""Convolutions inside modules capture keeps whole (mode-dependent or untraceable code) are sites too."""

import pytest
import torch

import tcnn_fx
from models import KeptWholeNet
from tcnn_fx import ConvAttention2d
from tcnn_fx.models.zoo import randomise_norms


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomise_norms(KeptWholeNet()).eval()


def test_sites_inside_kept_whole_modules(model):
    graph = tcnn_fx.trace(model, (torch.randn(1, 3, 16, 16),))
    info = graph.meta["tcnn_fx.capture"]
    assert {"block", "tail"} <= {*info.mode_leaves, *info.fallback_leaves}
    sites = {s.name: s for s in graph.meta["tcnn_fx.sites"]}
    assert {n for n, s in sites.items() if s.kind == "inner"} == {
        "block.expand", "block.depthwise", "block.project", "tail.conv", "tail.shared",
    }  # fmt: skip
    depthwise = sites["block.depthwise"]
    assert depthwise.convertible and depthwise.geometry.padding == (1, 1, 1, 1)  # its own ZeroPad2d child, folded
    assert depthwise.stage == sites["block.expand"].stage == 1 and sites["tail.conv"].stage == 2
    assert depthwise.input_size == depthwise.output_size == (8, 8)
    assert not sites["tail.shared"].convertible and "called 2 times" in sites["tail.shared"].reason


def test_inner_sites_convert_exactly_in_eval_and_keep_training_behaviour(model):
    x = torch.randn(2, 3, 16, 16)
    policy = tcnn_fx.Policy("all", include_pointwise=True)
    hybrid = tcnn_fx.rewrite(model, policy, (x,))
    report = tcnn_fx.report_of(hybrid)
    assert {"block.expand", "block.depthwise", "block.project", "tail.conv", "down"} <= set(report.converted)
    assert isinstance(hybrid.get_submodule("block.depthwise"), ConvAttention2d)
    assert not hasattr(hybrid.get_submodule("block"), "depthwise.static_padding")
    check = tcnn_fx.verify(model, hybrid, (x,))
    assert check.passed and {"block.depthwise", "tail.conv"} <= {c.name for c in check.sites}, check.table()
    hybrid.train(), model.train()  # the block's drop-connect still runs in training, as the model's does
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.allclose(hybrid(x), expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for shape in ((1, 3, 16, 16), (1, 3, 24, 20)):
            y = torch.randn(shape)
            assert torch.allclose(hybrid.eval()(y), model.eval()(y), rtol=1e-5, atol=1e-6)


def test_saved_hybrid_with_inner_sites_loads(model, tmp_path):
    hybrid = tcnn_fx.rewrite(model, "all", (torch.randn(1, 3, 16, 16),))
    tcnn_fx.save(hybrid, tmp_path / "h.pt")
    loaded = tcnn_fx.load(tmp_path / "h.pt", model=KeptWholeNet()).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), hybrid.eval()(x))
