"""Export as a user meets it: quiet runtime logs unless asked, a dynamic batch from a one-image example."""

import torch
from torch import nn

import tcnn_fx
from tcnn_fx.export import to_onnx, verify_onnx
from tcnn_fx.export.bench import with_content_weight
from tcnn_fx.export.lowering import Lowering


def test_runtime_warnings_only_when_asked(tmp_path, capfd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    hybrid = tcnn_fx.rewrite(model, tcnn_fx.Policy("all", include_stem=True), (x,))
    hybrid = with_content_weight(hybrid, 0.2)
    # The layer's own graph at a fixed size: float16 Mul nodes over constant maps make ONNX Runtime warn.
    path = to_onnx(hybrid, tmp_path / "h.onnx", (x,), fp16=True, dynamic_resolution=False,
                   lowering=Lowering(positional="maps", content="matmul"))  # fmt: skip
    capfd.readouterr()
    verify_onnx(hybrid, path, (x,))
    quiet = capfd.readouterr()
    verify_onnx(hybrid, path, (x,), log_level="warning")
    loud = capfd.readouterr()
    assert "onnxruntime" in loud.err + loud.out  # the float16 constant-folding warnings exist ...
    assert "onnxruntime" not in quiet.err + quiet.out  # ... and are not shown by default


def test_a_one_image_example_gives_a_dynamic_batch(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    hybrid = tcnn_fx.rewrite(model, tcnn_fx.Policy("all", include_stem=True), (torch.randn(1, 3, 8, 8),))
    for name, module in (("cnn", model), ("hybrid", hybrid)):
        path = to_onnx(module, tmp_path / f"{name}.onnx", (torch.randn(1, 3, 8, 8),))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in (1, 2, 8):
            x = torch.randn(batch, 3, 8, 8)
            (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(out), module(x), rtol=1e-5, atol=1e-5)
