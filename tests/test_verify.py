"""verify: whole-model and per-site comparisons, and their failure."""

import pytest
import torch

import tcnn_fx
from models import TinyResNet


def test_verify_passes_in_float32_and_float64():
    torch.manual_seed(0)
    for dtype, bound in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        model = TinyResNet().to(dtype).eval()
        x = torch.randn(2, 3, 16, 16, dtype=dtype)
        report = tcnn_fx.verify(model, tcnn_fx.rewrite(model, "all", (x,)), (x,))
        assert report.passed and report.rtol == bound
        assert report.output.max_rel <= bound and len(report.sites) == 3
        assert "passed" in report.table()


def test_verify_detects_a_changed_layer():
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    hybrid = tcnn_fx.rewrite(model, "all", (x,))
    with torch.no_grad():
        hybrid.b1.gate.fill_(0.5)
    report = tcnn_fx.verify(model, hybrid, (x,))
    assert not report.passed
    failing = {c.name for c in report.sites if not c.passed}
    assert failing == {"b1"} and not report.output.passed
    assert "FAIL" in report.table()


def test_rewrite_with_verify_raises_on_mismatch():
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    assert tcnn_fx.rewrite(model, "all", (x,), verify=True) is not None
    with pytest.raises(AssertionError, match="does not match"):
        tcnn_fx.rewrite(model, "all", (x,), verify=True, gate_init=0.3)


def test_verify_needs_a_rewritten_model():
    with pytest.raises(ValueError, match="not produced by tcnn_fx.rewrite"):
        tcnn_fx.verify(TinyResNet(), TinyResNet(), (torch.randn(1, 3, 16, 16),))


def test_per_site_check_survives_in_place_activations():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()  # nn.ReLU(inplace=True) after every convolution
    x = torch.randn(2, 3, 64, 64)
    report = tcnn_fx.verify(model, tcnn_fx.rewrite(model, "all", (x,)), (x,))
    assert report.passed, report.table()
    assert len(report.sites) == 4
