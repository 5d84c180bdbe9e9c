"""ConvAttention2d against the nn.Conv2d it came from: latency, FLOPs and achieved FLOP/s.

Both run side by side in one process, interleaved, in eval mode without
autograd (so the layer reuses its positional attention), float32 on the CPU.
The table says for each shape and batch the latency ratio, the FLOP ratio
(the limit of this construction: attention does more arithmetic than the
convolution) and the efficiency: the layer's achieved FLOP/s over the
convolution's.  Targets: at least 0.85 at 7x7 and 14x14 with 8 images, 0.8
with one; 28x28 and the CIFAR shape (C=64, 8x8) are reported.

Runtimes: ``torch`` is the layer as it runs by default (on a processor where
PyTorch dispatches to AVX-512, its compiled CPU kernel, ``tcnn_fx.layers.native``:
scores, softmax, mix and gather in one pass; on AVX2 the maps kernel,
``tcnn_fx.layers.native_maps``, for scores, softmax and mix, and PyTorch
operators around it, the gather on ``torch.bmm``); ``torch-ops`` the layer
composed from PyTorch operators alone (``TCNN_FX_NATIVE=0``, which turns both
kernels off); ``ort`` both exported to ONNX and run by ONNX
Runtime, the layer with every head's content weight at 0.1 (as converted, its
file would be the convolution's graph).  Each run also times, at 14x14 and
C=256, the attention's gather (every head applied to every channel) each way
the layer runs it: the compiled kernel (with the content scores, softmax and
mix it fuses), a oneDNN grouped convolution (inference without the kernel)
and ``torch.bmm`` on the BLAS (training, captured graphs); and, where the
projection kernel is used, the output projection on the same taps as the
strided convolution and as that kernel (``native_projection``).

Every run is a fresh plain ``python`` process with the environment as given
(``benchmarks.fresh_runs``); the table gives the median of the runs and their
range:

    python -m benchmarks.conv_attention_speed [--batch-sizes 8 1] [--runs 3] [--rounds 30] \
        [--runtime torch|torch-ops|ort] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks.fresh_runs import ONE_RUN, fresh_runs, spread
from tcnn_fx import ConvAttention2d
from tcnn_fx.export import to_onnx
from tcnn_fx.export.bench import with_content_weight
from tcnn_fx.export.onnx import _session
from tcnn_fx.layers import native, native_projection
from tcnn_fx.layers.backends import gather_bmm, gather_onednn
from tcnn_fx.timing import count_flops, time_side_by_side

#: (channels, input resolution, stride): ResNet-50's late stages, a 28x28 stage and CIFAR ResNets' last stage.
SHAPES = [(512, 7, 1), (512, 14, 2), (256, 14, 1), (128, 28, 1), (64, 8, 1)]
#: Efficiency targets by batch size, at the input resolutions in ``TARGET_RESOLUTIONS``.
EFFICIENCY_TARGETS = {8: 0.85, 1: 0.8}
TARGET_RESOLUTIONS = (7, 14)
#: Every head's content weight in the ONNX Runtime timings (as after fine-tuning).
CONTENT_WEIGHT = 0.1


def _runners(conv: nn.Module, layer: nn.Module, x: torch.Tensor, runtime: str, folder: str) -> dict:
    """Callables running the convolution and the layer on ``x`` in PyTorch eager or ONNX Runtime."""
    if runtime == "torch":
        return {"conv": lambda: conv(x), "attention": lambda: layer(x)}
    runners = {}
    # As converted, the layer's file is its convolution (the content branch adds nothing): time it as after
    # fine-tuning, every head's content weight open, lowered as to_onnx chooses for the CPU.
    opened = with_content_weight(layer, CONTENT_WEIGHT)
    for name, module in (("conv", conv), ("attention", opened)):
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
    """GFLOP/s of the gather at the 14x14, C=256 shape, batch 8, each way the layer runs it.

    Inference (no autograd, float32 CPU) runs it in the compiled kernel, which
    also computes the content scores (counted here) and their softmax and mix,
    or without the kernel as oneDNN grouped convolutions; training and captured
    graphs as ``torch.bmm`` on the BLAS.
    """
    heads, queries, channels, dim = 9, 196, 256, 28
    values, maps = torch.randn(8, channels, 14, 14), torch.rand(8, heads, queries, queries)
    runners = {"bmm": lambda: gather_bmm(values, maps), "onednn": lambda: gather_onednn(values, maps)}
    kernel = native.attend_gather() if native.enabled() else None
    if kernel is not None:
        q, k = torch.randn(8, heads * dim, queries), torch.randn(8, heads * dim, queries)
        padded = -(-queries // native.QUERY_BLOCK) * native.QUERY_BLOCK
        base, weight = torch.rand(heads, queries, padded), torch.full((heads,), 0.5)
        runners["kernel"] = lambda: kernel(q, k, values.flatten(2), base, weight, heads)
    with torch.no_grad():
        timing = time_side_by_side(runners, rounds=rounds)
    gather = 2 * 8 * heads * queries * queries * channels
    flops = {"bmm": gather, "onednn": gather, "kernel": gather + 2 * 8 * heads * queries * queries * dim}
    return {f"{name}_gflops": flops[name] / timing[name].median / 1e9 for name in runners}


#: (batch, channels, input resolution, stride) of the projection timings: a CIFAR ResNet layer at its batch, ResNet-50's.
PROJECTION_SHAPES = [(128, 64, 8, 1), (128, 32, 16, 2), (8, 256, 14, 1), (8, 512, 7, 1)]


def projection_times(rounds: int) -> list[dict]:
    """Milliseconds of the layer's output projection on the same gathered taps, each way inference runs it.

    ``convolution``: the strided convolution on oneDNN (with its copy of the
    taps into its blocked layout); ``kernel``: the projection kernel
    (``native_projection``), where it is used here.  Empty where it is not.
    """
    rows = []
    with torch.no_grad():
        for batch, channels, resolution, stride in PROJECTION_SHAPES:
            torch.manual_seed(0)
            layer = ConvAttention2d.from_conv(nn.Conv2d(channels, channels, 3, stride, 1, bias=False)).eval()
            out = (resolution - 1) // stride + 1
            taps = torch.randn(batch, channels, layer.num_heads, out * out)
            if not native_projection.usable(taps):
                return []
            ops = native_projection.operands(layer.weight, layer.groups)
            runners = {
                "convolution": lambda layer=layer, taps=taps: layer._project_convolution(taps),
                "kernel": lambda layer=layer, taps=taps, ops=ops: native_projection.project(
                    taps, ops, None, layer.out_channels
                ),
            }
            timing = time_side_by_side(runners, rounds=rounds)
            rows.append(
                {"batch": batch, "channels": channels, "resolution": resolution, "stride": stride}
                | {f"{name}_ms": timing[name].median * 1e3 for name in runners}
            )
    return rows


def machine() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "capability": torch.backends.cpu.get_cpu_capability(),
        "allocator_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "none",
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


def _target(row: dict) -> str:
    goal = EFFICIENCY_TARGETS.get(row["batch"])
    if goal is None or row["resolution"] not in TARGET_RESOLUTIONS:
        return "-"
    return "met" if row["efficiency"] >= goal else f"missed (>= {goal})"


def markdown(runs: list[dict]) -> str:
    """One row per batch and shape: medians of the runs, the efficiency's range, the target at the median."""
    lines = [
        (
            "| batch | C | input | stride | conv ms | attention ms | latency ratio | FLOP ratio "
            "| efficiency (runs' range) | target | max rel. error |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, first in enumerate(runs[0]["results"]):
        rows = [run["results"][i] for run in runs]
        median = {key: statistics.median(r[key] for r in rows) for key in ("conv_ms", "attention_ms", "efficiency")}
        row = first | median
        lines.append(
            f"| {row['batch']} | {row['channels']} | {row['resolution']}x{row['resolution']} | {row['stride']} | "
            f"{row['conv_ms']:.2f} | {row['attention_ms']:.2f} | {row['attention_ms'] / row['conv_ms']:.2f} | "
            f"{row['flop_ratio']:.2f} | {spread([r['efficiency'] for r in rows])} | {_target(row)} | "
            f"{max(r['max_relative_error'] for r in rows):.1e} |"
        )
    return "\n".join(lines)


def one_run(batch_sizes: list[int], rounds: int, runtime: str) -> dict:
    """Every shape at every batch size, and the gather's rates, measured in this process."""
    rows = [measure(c, r, s, batch, rounds, runtime) for batch in batch_sizes for c, r, s in SHAPES]
    kernel = runtime == "torch" and native.enabled() and native.attend_gather() is not None
    return {
        "machine": machine() | {"compiled_kernel": kernel},
        "gather": gather_rates(rounds),
        "projection": projection_times(rounds),
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--runs", type=int, default=3, help="independent runs, each a fresh process")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timed rounds per shape and run")
    parser.add_argument("--json", help="also write every run's results to this JSON file")
    parser.add_argument(
        "--runtime",
        choices=["torch", "torch-ops", "ort"],
        default="torch",
        help="PyTorch eager (with the compiled kernel where it is used), PyTorch operators alone, or "
        "both exported to ONNX and run by ONNX Runtime (CPU)",
    )
    parser.add_argument(ONE_RUN, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runtime == "torch-ops":
        os.environ[native.SETTING] = "0"
    runtime = "ort" if args.runtime == "ort" else "torch"
    if args.one_run:
        print(json.dumps(one_run(args.batch_sizes, args.rounds, runtime)))
        return
    settings = ["--batch-sizes", *map(str, args.batch_sizes), "--rounds", str(args.rounds), "--runtime", args.runtime]
    runs = fresh_runs("benchmarks.conv_attention_speed", settings, args.runs)
    print(json.dumps(runs[0]["machine"]))
    for i, run in enumerate(runs, 1):
        rates = " ".join(f"{name.removesuffix('_gflops')} {rate:.0f}" for name, rate in run["gather"].items())
        print(f"run {i}: gather at 14x14, C=256, b8, GFLOP/s: {rates}")
        for row in run["projection"]:
            print(
                f"run {i}: projection at b{row['batch']}, C={row['channels']}, {row['resolution']}x{row['resolution']}"
                f" s{row['stride']}: convolution {row['convolution_ms']:.2f} ms, kernel {row['kernel_ms']:.2f} ms"
            )
    print(markdown(runs))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": settings, "runs": runs}, out, indent=2)


if __name__ == "__main__":
    main()
