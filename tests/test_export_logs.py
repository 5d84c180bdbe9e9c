"""ONNX Runtime's own log messages stay out of the user's terminal unless asked for."""

import torch
from torch import nn

import tcnn_fx
from tcnn_fx.export import to_onnx, verify_onnx


def test_runtime_warnings_only_when_asked(tmp_path, capfd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    hybrid = tcnn_fx.rewrite(model, tcnn_fx.Policy("all", include_stem=True), (x,))
    path = to_onnx(hybrid, tmp_path / "h.onnx", (x,), fp16=True)
    capfd.readouterr()
    verify_onnx(hybrid, path, (x,))
    quiet = capfd.readouterr()
    verify_onnx(hybrid, path, (x,), log_level="warning")
    loud = capfd.readouterr()
    assert "onnxruntime" in loud.err + loud.out  # the float16 constant-folding warnings exist ...
    assert "onnxruntime" not in quiet.err + quiet.out  # ... and are not shown by default
