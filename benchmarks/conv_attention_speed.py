"""ConvAttention2d against the nn.Conv2d it came from: latency, FLOPs and achieved FLOP/s.

Both run side by side in one process, interleaved, in eval mode without
autograd (so the layer reuses its positional attention), float32 on the CPU.
The table says for each shape the latency ratio, the FLOP ratio (the limit of
this construction: attention does more arithmetic than the convolution) and
the achieved FLOP/s of each; the target is that the layer achieves at least
80% of the convolution's FLOP/s at 7x7 and 14x14.

Runtimes: ``torch`` is the layer as it runs by default, with its compiled CPU
kernel (``tcnn_fx.layers.native``: scores, softmax, mix and gather in one pass)
where that could be built; ``torch-ops`` the layer composed from PyTorch
operators alone (``TCNN_FX_NATIVE=0``); ``ort`` both exported to ONNX and run by
ONNX Runtime, the layer with every head's content weight at 0.1 (as converted,
its file would be the convolution's graph).  It also times, at 14x14 and C=256, the attention's gather (every
head applied to every channel) each way the layer runs it: the compiled kernel
(with the content scores, softmax and mix it fuses), a oneDNN grouped
convolution (inference without the kernel) and ``torch.bmm`` on the BLAS
(training, captured graphs).

    python benchmarks/conv_attention_speed.py [--batch 8] [--rounds 30] [--runtime torch|torch-ops|ort] [--json out.json]

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
from tcnn_fx.export.bench import with_content_weight
from tcnn_fx.export.onnx import _session
from tcnn_fx.layers import native
from tcnn_fx.layers.backends import gather_bmm, gather_onednn
from tcnn_fx.timing import count_flops, time_side_by_side

#: (channels, input resolution, stride): the shapes the targets are stated for.
SHAPES = [(512, 7, 1), (512, 14, 2), (256, 14, 1), (128, 28, 1)]
EFFICIENCY_TARGET = 0.8
#: glibc settings that keep freed memory instead of returning it to the system (PyTorch's CPU allocator
#: does not cache, so without them every large attention buffer is page-faulted in anew).
MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
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
    parser.add_argument("--runtime", choices=["torch", "torch-ops", "ort"], default="torch",
                        help="PyTorch eager (with the compiled kernel where built), PyTorch operators alone, or both "
                        "exported to ONNX and run by ONNX Runtime (CPU)")
    args = parser.parse_args()
    if args.runtime == "torch-ops":
        os.environ[native.SETTING] = "0"
    runtime = "ort" if args.runtime == "ort" else "torch"
    rows = [measure(c, r, s, args.batch, args.rounds, runtime) for c, r, s in SHAPES]
    kernel = runtime == "torch" and native.enabled() and native.attend_gather() is not None
    report = {"machine": machine() | {"compiled_kernel": kernel}, "gather": gather_rates(args.rounds), "results": rows}
    print(json.dumps(report["machine"]))
    rates = " ".join(f"{name.removesuffix('_gflops')} {rate:.0f}" for name, rate in report["gather"].items())
    print(f"gather at 14x14, C=256, GFLOP/s: {rates}")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
