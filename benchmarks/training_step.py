"""Training step (forward, backward, SGD step) of a hybrid against its CNN, measured side by side in one run.

Issue target: hybrid / CNN at most 1.25 x the FLOP ratio for CIFAR ResNet-20
and ResNet-56 (policy ``last``, batch 128, 32 px) and ResNet-50 (``stage3+4``,
batch 16, 160 px).  Each model's step is timed interleaved with its CNN's
and, in the same run, with the hybrid trained through autograd over the
composed operators (the layer before ``attention_backward``) and with the
compiled kernel over the attention maps off (``TCNN_FX_NATIVE_MAPS=0`` for
that step: the forward's scores, softmax and mix and the backward's
elementwise work on PyTorch operators), so the table shows what the
hand-written backward and the kernel changed.  Several independent runs
(``--runs``, each a fresh process) give the spread.  Peak memory of one
training step (resident set growth of a fresh process over three steps) is
measured per model in its own process.

Run in a plain ``python`` process with default settings (no allocator
variables):

    python benchmarks/training_step.py [--runs 3] [--rounds 5] [--json docs/results/training_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import tcnn_fx
from benchmarks.fresh_runs import ONE_RUN, fresh_runs, spread
from tcnn_fx.layers import conv_attention, native_maps
from tcnn_fx.layers.backends import Backend, choose
from tcnn_fx.specs import load_model
from tcnn_fx.timing import time_side_by_side

#: name: (spec, policy, batch, size)
CASES = {
    "resnet20": ("cifar:resnet20", "last", 128, 32),
    "resnet56": ("cifar:resnet56", "last", 128, 32),
    "resnet50": ("torchvision:resnet50", "stage3+4", 16, 160),
}


def setup(case: str, variant: str):
    """The model (``cnn`` or ``hybrid``) in train mode, its SGD optimiser and one batch."""
    spec, policy, batch, size = CASES[case]
    torch.manual_seed(0)
    model = load_model(spec).train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    if variant == "hybrid":
        model = tcnn_fx.rewrite(model, policy, (x[:1],))
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimiser.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimiser.step()

    return model, step


def composed(step):
    """``step`` with the layers' attention trained through autograd over the composed operators."""

    def run():
        conv_attention.choose = lambda x: Backend.COMPOSED  # training: autograd through the composed operators
        try:
            step()
        finally:
            conv_attention.choose = choose

    return run


def unfused(step):
    """``step`` with the work over the attention maps on PyTorch operators instead of their compiled kernel."""

    def run():
        setting = os.environ.get(native_maps.SETTING)
        os.environ[native_maps.SETTING] = "0"
        try:
            step()
        finally:
            if setting is None:
                del os.environ[native_maps.SETTING]
            else:
                os.environ[native_maps.SETTING] = setting

    return run


def time_case(case: str, rounds: int) -> dict:
    _, cnn = setup(case, "cnn")
    hybrid_model, hybrid = setup(case, "hybrid")
    steps = {"cnn": cnn, "hybrid": hybrid, "unfused": unfused(hybrid), "composed": composed(hybrid)}
    timing = time_side_by_side(steps, warmup=1, rounds=rounds)
    flop_ratio = tcnn_fx.report_of(hybrid_model).flop_ratio
    ratio = timing["hybrid"].median / timing["cnn"].median
    return {
        "cnn_s": timing["cnn"].median, "hybrid_s": timing["hybrid"].median, "composed_s": timing["composed"].median,
        "unfused_s": timing["unfused"].median, "maps_kernel": native_maps.enabled(),
        "ratio": ratio, "composed_ratio": timing["composed"].median / timing["cnn"].median,
        "unfused_ratio": timing["unfused"].median / timing["cnn"].median,
        "flop_ratio": flop_ratio, "ratio_over_flop_ratio": ratio / flop_ratio,
    }  # fmt: skip


def peak_memory(case: str, variant: str) -> float:
    """Resident set growth (MiB) over three training steps, in a fresh process."""
    code = (
        "import resource, sys; sys.argv = ['x']; import benchmarks.training_step as b; "
        f"_, step = b.setup({case!r}, {variant!r}); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "[step() for _ in range(3)]; print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from " + ", ".join(CASES))
    parser.add_argument("--runs", type=int, default=3, help="independent runs (fresh processes) for the spread")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per run")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(ONE_RUN, action="store_true", help=argparse.SUPPRESS)  # a child of --runs
    args = parser.parse_args()
    cases = args.cases.split(",")
    if args.one_run:
        print(json.dumps({case: time_case(case, args.rounds) for case in cases}))
        return
    runs = fresh_runs("benchmarks.training_step", ["--cases", args.cases, "--rounds", str(args.rounds)], args.runs)
    memory = {case: {v: peak_memory(case, v) for v in ("cnn", "hybrid")} for case in cases}
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__},
        "runs": runs, "peak_memory_mib": memory,
    }  # fmt: skip
    print(
        "| model | FLOP ratio | train step hybrid / CNN (median of runs, min-max) | / FLOP ratio | maps kernel "
        "off / CNN | composed autograd / CNN | peak memory hybrid / CNN |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        ratios = [run[case]["ratio"] for run in runs]
        composed_ratios = [run[case]["composed_ratio"] for run in runs]
        unfused_ratios = [run[case]["unfused_ratio"] for run in runs]
        flop = runs[0][case]["flop_ratio"]
        mem = memory[case]
        print(f"| {case} {CASES[case][1]} b{CASES[case][2]} @{CASES[case][3]} | {flop:.3f} | {spread(ratios)} | "
              f"{statistics.median(ratios) / flop:.2f} | {spread(unfused_ratios)} | "
              f"{statistics.median(composed_ratios):.2f} | "
              f"{mem['hybrid'] / max(mem['cnn'], 1e-9):.2f} ({mem['hybrid']:.0f} / {mem['cnn']:.0f} MiB) |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
