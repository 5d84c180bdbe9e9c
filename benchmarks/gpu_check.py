"""The GPU checks, in one script that writes one JSON (under 7 minutes on one NVIDIA GPU).

1. **Accuracy on CUDA**: a ``ConvAttention2d`` (gates open) and ResNet-50
   hybrids (``stage4``, ``stage3+4``, gates open) in PyTorch on CUDA, float32
   with TF32 off and bfloat16 autocast, against the same model in float64 on
   the CPU (relative error max|a - b| / max|b|).
2. **Latency**: hybrid / CNN at batch 8 and 64, 224 px, in PyTorch eager
   (float32, TF32 off) and in ONNX Runtime's CUDA provider (and TensorRT's,
   where present), for ``stage4`` and ``stage3+4``; the hybrids with every
   head's content weight at 0.1 (as after fine-tuning), exported with the
   ``gpu`` lowering at opset 23 (the ``Attention`` op) and, for comparison,
   the decomposed ``matmul`` lowering at opset 18.  Timed interleaved, medians.
3. **Placement**: which ONNX Runtime provider ran each op type (from its
   profile), so a fallback to the CPU shows.

Every part records its error instead of stopping the script; the JSON is
rewritten after each part.

    python benchmarks/gpu_check.py --json docs/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torchvision

import tcnn_fx
from tcnn_fx.export import to_onnx, verify_onnx
from tcnn_fx.export.bench import with_content_weight
from tcnn_fx.export.lowering import ATTENTION_OPSET, Lowering
from tcnn_fx.layers.conv_attention import ConvAttention2d
from tcnn_fx.timing import time_side_by_side

POLICIES = ("stage4", "stage3+4")
BATCHES = (8, 64)
CONTENT_WEIGHT = 0.1


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double().cpu() - expected).abs().max() / expected.abs().max())


def accuracy(models: dict[str, torch.nn.Module]) -> dict:
    """Each model on CUDA (float32 without TF32, bfloat16 autocast) against itself in float64 on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {}
    for name, (model, x) in models.items():
        with torch.no_grad():
            reference = model.double()(x.double())
            model.float().cuda()
            fp32 = model(x.cuda())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = model(x.cuda())
        model.cpu()
        results[name] = {"float32": _relative(fp32, reference), "bfloat16_autocast": _relative(bf16.float(), reference)}
    return results


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p in available]


def _session(path: Path, provider: str, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    settings = {"use_tf32": "0"} if provider == "CUDAExecutionProvider" else {}
    return ort.InferenceSession(str(path), options, providers=[(provider, settings), "CPUExecutionProvider"])


def placement(path: Path, provider: str, x: torch.Tensor, folder: Path) -> dict[str, dict[str, int]]:
    """Op types by the provider ONNX Runtime ran them on, from one profiled run."""
    session = _session(path, provider, str(folder / "profile"))
    session.run(None, {session.get_inputs()[0].name: x.numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    counts: Counter = Counter()
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event["name"].endswith("_kernel_time"):
            counts[(args["provider"], args.get("op_name", "?"))] += 1
    table: dict[str, dict[str, int]] = {}
    for (where, op), n in counts.items():
        table.setdefault(where, {})[op] = n
    return table


def latency(cnn, hybrids: dict, folder: Path, rounds: int) -> dict:
    """hybrid / CNN latency per batch in PyTorch eager (CUDA, float32) and each ONNX Runtime GPU provider."""
    example = (torch.randn(2, 3, 224, 224),)
    files = {"cnn": to_onnx(cnn, folder / "cnn.onnx", example)}
    for policy, hybrid in hybrids.items():
        files[f"{policy} gpu"] = to_onnx(hybrid, folder / f"{policy}-gpu.onnx", example, opset=ATTENTION_OPSET,
                                         lowering=Lowering(target="gpu"))  # fmt: skip
        files[f"{policy} matmul"] = to_onnx(hybrid, folder / f"{policy}-matmul.onnx", example,
                                            lowering=Lowering(content="matmul"))  # fmt: skip
    modules = (
        {"cnn": cnn} | {f"{p} gpu": h for p, h in hybrids.items()} | {f"{p} matmul": h for p, h in hybrids.items()}
    )
    results: dict = {"providers": _providers(), "placement": {}}
    for provider in results["providers"]:
        for name, path in files.items():
            try:
                verify_onnx(modules[name], path, example, providers=(provider,))
                verified = "passed"
            except Exception as error:  # noqa: BLE001 (recorded; the timing still runs)
                verified = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            results.setdefault("verify", {}).setdefault(provider, {})[name] = verified
            results["placement"].setdefault(provider, {})[name] = placement(path, provider, example[0], folder)
    for batch in BATCHES:
        x = torch.randn(batch, 3, 224, 224)
        xc = x.cuda()
        fns = {("torch", "cnn"): lambda xc=xc: cnn.cuda()(xc)}
        fns |= {("torch", p): (lambda h=h, xc=xc: h.cuda()(xc)) for p, h in hybrids.items()}
        for provider in results["providers"]:
            for name, path in files.items():
                session = _session(path, provider)
                feeds = {session.get_inputs()[0].name: x.numpy()}
                fns[(provider, name)] = lambda s=session, f=feeds: s.run(None, f)
        with torch.no_grad():
            timing = time_side_by_side(fns, warmup=3, rounds=rounds, synchronize=True)
        row = {"torch": {p: timing[("torch", p)].median / timing[("torch", "cnn")].median for p in hybrids}}
        for provider in results["providers"]:
            cnn_s = timing[(provider, "cnn")].median
            row[provider] = {name: timing[(provider, name)].median / cnn_s for name in files if name != "cnn"}
        row["seconds"] = {f"{k[0]} {k[1]}": t.median for k, t in timing.items()}
        results[f"batch {batch}"] = row
    cnn.cpu()
    for hybrid in hybrids.values():
        hybrid.cpu()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_check.json")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU paths")
    start = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save() -> None:
        results["seconds"] = time.perf_counter() - start
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    torch.manual_seed(0)
    cnn = torchvision.models.resnet50().eval()
    x = torch.randn(2, 3, 224, 224)
    hybrids = {p: with_content_weight(tcnn_fx.rewrite(cnn, p, (x,)), CONTENT_WEIGHT).eval() for p in POLICIES}
    layer = with_content_weight(ConvAttention2d.from_conv(torch.nn.Conv2d(256, 256, 3, padding=1)).eval(), 0.3)
    parts = {
        "accuracy": lambda: accuracy(
            {"layer 14x14": (layer, torch.randn(4, 256, 14, 14))}
            | {f"resnet50 {p}": (h, x) for p, h in hybrids.items()}
        ),
        "latency": lambda: latency(cnn, hybrids, Path(folder), args.rounds),
    }
    with tempfile.TemporaryDirectory(prefix="tcnn_fx-gpu-") as folder:
        for name, part in parts.items():
            try:
                results[name] = part()
            except Exception:  # noqa: BLE001 (recorded; the other parts still run)
                results[name] = {"error": traceback.format_exc(limit=4)}
            save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
