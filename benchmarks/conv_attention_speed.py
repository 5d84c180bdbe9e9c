"""ConvAttention2d against the nn.Conv2d it came from: latency, FLOPs and achieved FLOP/s.

Both run side by side in one process, interleaved, in eval mode without
autograd (so the layer reuses its positional attention), float32 on the CPU.
The table says for each shape the latency ratio, the FLOP ratio (the limit of
this construction: attention does more arithmetic than the convolution) and
the achieved FLOP/s of each; the target is that the layer achieves at least
80% of the convolution's FLOP/s at 7x7 and 14x14.  It also times the
attention's gather (every head applied to every channel) both ways the layer
runs it: as a oneDNN grouped convolution (inference) and as ``torch.bmm`` on
the BLAS (training, captured graphs).

    python benchmarks/conv_attention_speed.py [--batch 8] [--rounds 30] [--runtime torch|ort] [--json out.json]

The layer allocates large attention maps each call; glibc returns such blocks
to the system and faults them in again on the next call.  PyTorch's CPU
performance guide recommends an allocator that keeps them (jemalloc,
tcmalloc); with glibc the same effect comes from

    MALLOC_MMAP_THRESHOLD_=10000000000 MALLOC_TRIM_THRESHOLD_=10000000000 python benchmarks/...

and the machine description in the output says which was in force.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from tcnn_fx import ConvAttention2d
from tcnn_fx.export import to_onnx
from tcnn_fx.export.onnx import _session
from tcnn_fx.layers.conv_attention import _gather_bmm, _gather_onednn
from tcnn_fx.timing import count_flops, time_side_by_side

#: (channels, input resolution, stride): the shapes the targets are stated for.
SHAPES = [(512, 7, 1), (512, 14, 2), (256, 14, 1), (128, 28, 1)]
EFFICIENCY_TARGET = 0.8
#: glibc settings that keep freed memory instead of returning it to the system (PyTorch's CPU allocator
#: does not cache, so without them every large attention buffer is page-faulted in anew).
MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
TARGET_RESOLUTIONS = (7, 14)


def _runners(conv: nn.Module, layer: nn.Module, x: torch.Tensor, runtime: str, folder: str) -> dict:
    """Callables running the convolution and the layer on ``x`` in PyTorch eager or ONNX Runtime."""
    if runtime == "torch":
        return {"conv": lambda: conv(x), "attention": lambda: layer(x)}
    runners = {}
    for name, module in (("conv", conv), ("attention", layer)):
        path = to_onnx(module, Path(folder) / f"{name}.onnx", (x,))
        session = _session(path, "CPUExecutionProvider", spinning=False)
        feeds = {session.get_inputs()[0].name: x.numpy()}
        runners[name] = lambda s=session, f=feeds: s.run(None, f)
    return runners


def measure(channels: int, resolution: int, stride: int, batch: int, rounds: int, runtime: str = "torch") -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False).eval()
    layer = ConvAttention2d.from_conv(conv).eval()
    x = torch.randn(batch, channels, resolution, resolution)
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        error = ((layer(x) - conv(x)).abs().max() / conv(x).abs().max()).item()
        flops = {"conv": count_flops(lambda: conv(x)), "attention": count_flops(lambda: layer(x))}
        timing = time_side_by_side(_runners(conv, layer, x, runtime, folder), rounds=rounds)
    rate = {name: flops[name] / timing[name].median for name in flops}
    return {
        "channels": channels,
        "resolution": resolution,
        "stride": stride,
        "batch": batch,
        "runtime": runtime,
        "conv_ms": timing["conv"].median * 1e3,
        "attention_ms": timing["attention"].median * 1e3,
        "latency_ratio": timing["attention"].median / timing["conv"].median,
        "flop_ratio": flops["attention"] / flops["conv"],
        "conv_gflops": rate["conv"] / 1e9,
        "attention_gflops": rate["attention"] / 1e9,
        "efficiency": rate["attention"] / rate["conv"],
        "max_relative_error": error,
    }


def gather_rates(rounds: int) -> dict:
    """GFLOP/s of the gather at the 14x14, C=256 shape, batch 8, both ways the layer runs it.

    Inference (no autograd, float32 CPU) runs it as oneDNN grouped
    convolutions, training and captured graphs as ``torch.bmm`` on the BLAS.
    """
    values, maps = torch.randn(8, 256, 14, 14), torch.rand(8, 9, 196, 196)
    with torch.no_grad():
        timing = time_side_by_side(
            {"bmm": lambda: _gather_bmm(values, maps), "onednn": lambda: _gather_onednn(values, maps)}, rounds=rounds
        )
    flops = 2 * 8 * 9 * 196 * 196 * 256
    return {f"{name}_gflops": flops / timing[name].median / 1e9 for name in ("bmm", "onednn")}


def machine() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "malloc": {k: os.environ[k] for k in MALLOC_SETTINGS if k in os.environ} or "glibc defaults",
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(rows: list[dict]) -> str:
    lines = [
        "| C | input | stride | conv ms | attention ms | latency ratio | FLOP ratio | conv GFLOP/s | attention GFLOP/s | efficiency | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-" if r["resolution"] not in TARGET_RESOLUTIONS else ("met" if r["efficiency"] >= EFFICIENCY_TARGET else "missed")
        lines.append(
            f"| {r['channels']} | {r['resolution']}x{r['resolution']} | {r['stride']} | {r['conv_ms']:.2f} | "
            f"{r['attention_ms']:.2f} | {r['latency_ratio']:.2f} | {r['flop_ratio']:.2f} | {r['conv_gflops']:.0f} | "
            f"{r['attention_gflops']:.0f} | {r['efficiency']:.2f} | {target} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--runtime", choices=["torch", "ort"], default="torch",
                        help="PyTorch eager, or both exported to ONNX and run by ONNX Runtime (CPU)")
    args = parser.parse_args()
    rows = [measure(c, r, s, args.batch, args.rounds, args.runtime) for c, r, s in SHAPES]
    report = {"machine": machine(), "gather": gather_rates(args.rounds), "results": rows}
    print(json.dumps(report["machine"]))
    rates = report["gather"]
    print(f"gather at 14x14, C=256: oneDNN {rates['onednn_gflops']:.0f} GFLOP/s, bmm {rates['bmm_gflops']:.0f} GFLOP/s")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
