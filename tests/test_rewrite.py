"""rewrite: the converted model equals the original, the original is untouched, reports and modes."""

import copy
import io

import pytest
import torch

import tcnn_fx
from models import FunctionalNet, TinyResNet
from tcnn_fx import ConvAttention2d


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_rewrite_converts_the_chosen_sites_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    before = snapshot(model)
    x = torch.randn(2, 3, 16, 16)
    hybrid = tcnn_fx.rewrite(model, "all", (x,))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, ConvAttention2d) for m in model.modules())
    report = tcnn_fx.report_of(hybrid)
    assert report.converted == ("a1", "b1", "b2")
    assert set(report.skipped) == {"stem", "shortcut"}
    for name in report.converted:
        assert isinstance(hybrid.get_submodule(name), ConvAttention2d)
    # Untouched parameters and buffers are equal bit for bit, and not shared with the model.
    hybrid_state = hybrid.state_dict()
    for key, value in before.items():
        assert torch.equal(hybrid_state[key], value), key
    assert hybrid.stem.weight.data_ptr() != model.stem.weight.data_ptr()
    assert report.flop_ratio > 1 and report.param_ratio > 1
    with torch.no_grad():
        assert ((hybrid(x) - model(x)).abs().max() / model(x).abs().max()) <= 1e-5


def test_functional_site_with_explicit_pad_is_converted():
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    x = torch.randn(2, 3, 16, 16)
    hybrid = tcnn_fx.rewrite(model, ["same"], (x,))
    assert isinstance(hybrid.same, ConvAttention2d) and hybrid.same.geometry.padding == (0, 0, 0, 0)
    assert "same.weight" in hybrid.state_dict()
    pads = [n for n in hybrid.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.pad]
    assert len(pads) == 1  # its amounts are computed from the input size: the pad stays, in front of the layer
    report = tcnn_fx.verify(model, hybrid, (x,))
    assert report.passed, report.table()
    with torch.no_grad():  # so the hybrid pads as the model does at a size of other parity
        y = torch.randn(1, 3, 17, 15)
        assert torch.allclose(hybrid(y), model(y), rtol=1e-5, atol=1e-6)


def test_train_mode_and_gradients():
    torch.manual_seed(0)
    model = TinyResNet().train()
    hybrid = tcnn_fx.rewrite(model, "last", (torch.randn(2, 3, 16, 16),))
    assert hybrid.training and hybrid.b2.training
    out = hybrid(torch.randn(4, 3, 16, 16))
    out.sum().backward()
    assert hybrid.b2.gate.grad is not None and hybrid.stem_bn.weight.grad is not None
    hybrid.eval()
    assert not hybrid.b2.training and not hybrid.stem_bn.training


def test_state_dict_round_trip_and_deepcopy():
    model = TinyResNet().eval()
    x = torch.randn(1, 3, 16, 16)
    hybrid = tcnn_fx.rewrite(model, "last", (x,))
    buffer = io.BytesIO()
    torch.save(hybrid.state_dict(), buffer)
    buffer.seek(0)
    other = tcnn_fx.rewrite(TinyResNet().eval(), "last", (x,))
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other(x), hybrid(x))
    assert torch.equal(copy.deepcopy(hybrid)(x), hybrid(x))


def test_fold_norm_in_eval_mode():
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2), module.weight.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    hybrid = tcnn_fx.rewrite(model, "all", (x,), fold_norm=True)
    report = tcnn_fx.report_of(hybrid)
    assert report.folded_norms == {"a1": "a1_bn", "b1": "b1_bn"}
    assert not hasattr(hybrid, "a1_bn")
    result = tcnn_fx.verify(model, hybrid, (x,))
    assert result.passed, result.table()


def test_layer_options_reach_the_layers():
    hybrid = tcnn_fx.rewrite(TinyResNet(), "last", (torch.randn(1, 3, 16, 16),), qk_dim=4, locality_strength=30.0)
    assert hybrid.b2.qk_dim == 4 and torch.all(hybrid.b2.locality == 30.0)
    with pytest.raises(TypeError, match="either config or layer options"):
        tcnn_fx.rewrite(TinyResNet(), "last", (torch.randn(1, 3, 16, 16),), config=tcnn_fx.ConvAttentionConfig(), qk_dim=4)


def test_failures_return_nothing_half_done():
    model = TinyResNet()
    with pytest.raises(tcnn_fx.PolicyError):
        tcnn_fx.rewrite(model, "stage7", (torch.randn(1, 3, 16, 16),))
    assert not any(isinstance(m, ConvAttention2d) for m in model.modules())


def test_mixed_modes_are_kept():
    model = TinyResNet().train()
    model.stem_bn.eval()  # a frozen norm inside a model being trained
    hybrid = tcnn_fx.rewrite(model, "last", (torch.randn(2, 3, 16, 16),))
    assert hybrid.training and hybrid.b2.training and hybrid.a1_bn.training
    assert not hybrid.stem_bn.training
    assert not model.stem_bn.training and model.a1_bn.training
