"""Whole-model eager inference, hybrid against its CNN, side by side in one process, several fresh processes.

Targets (PyTorch eager, float32, CPU, eval mode without autograd, the
hybrids as ``tcnn_fx.rewrite`` returns them): ResNet-50 at 224 px, batch 8,
``stage4`` at most 1.05 and ``stage3+4`` at most 1.35 (FLOP ratios 1.033 and
1.296); CIFAR ResNet-20 and ResNet-56, policy ``last``, batch 128, at most
1.15 x their FLOP ratio.  Each run (a fresh plain ``python`` process,
``benchmarks.fresh_runs``) times every model's hybrids interleaved with its
CNN; the table gives the median of the runs' ratios and their range.

    python -m benchmarks.inference_speed [--runs 3] [--rounds 8] [--cases resnet50,resnet20,resnet56] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import tcnn_fx
from benchmarks.fresh_runs import ONE_RUN, fresh_runs, spread
from tcnn_fx.specs import load_model
from tcnn_fx.timing import time_side_by_side

#: name: (spec, {policy: target}, batch, size); a target is a latency ratio, or ``(factor, "x FLOP ratio")``.
CASES = {
    "resnet50": ("torchvision:resnet50", {"stage4": 1.05, "stage3+4": 1.35}, 8, 224),
    "resnet20": ("cifar:resnet20", {"last": (1.15, "x FLOP ratio")}, 128, 32),
    "resnet56": ("cifar:resnet56", {"last": (1.15, "x FLOP ratio")}, 128, 32),
}


def time_case(case: str, rounds: int) -> dict:
    """The CNN and each of its hybrids timed interleaved: latency ratios and FLOP ratios per policy."""
    spec, targets, batch, size = CASES[case]
    torch.manual_seed(0)
    model = load_model(spec).eval()
    x = torch.randn(batch, 3, size, size)
    hybrids = {policy: tcnn_fx.rewrite(model, policy, (x[:1],)).eval() for policy in targets}
    with torch.no_grad():
        calls = {"cnn": lambda: model(x)} | {p: (lambda h=h: h(x)) for p, h in hybrids.items()}
        timing = time_side_by_side(calls, warmup=2, rounds=rounds)
    result = {"cnn_s": timing["cnn"].median}
    for policy, hybrid in hybrids.items():
        result[policy] = {
            "hybrid_s": timing[policy].median,
            "latency_ratio": timing[policy].median / timing["cnn"].median,
            "flop_ratio": tcnn_fx.report_of(hybrid).flop_ratio,
        }
    return result


def _verdict(ratio: float, flop_ratio: float, target) -> tuple[str, str]:
    """The target in words and whether ``ratio`` meets it."""
    if isinstance(target, tuple):
        factor, _ = target
        return f"<= {factor} x FLOP ratio", "met" if ratio <= factor * flop_ratio else "missed"
    return f"<= {target}", "met" if ratio <= target else "missed"


def markdown(runs: list[dict], cases: list[str]) -> str:
    lines = [
        (
            "| model | policy | batch @ size | CNN s | hybrid / CNN (median of runs, range) | FLOP ratio "
            "| / FLOP ratio | target | |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        spec, targets, batch, size = CASES[case]
        cnn = statistics.median(run[case]["cnn_s"] for run in runs)
        for policy, target in targets.items():
            ratios = [run[case][policy]["latency_ratio"] for run in runs]
            flop = runs[0][case][policy]["flop_ratio"]
            median = statistics.median(ratios)
            goal, verdict = _verdict(median, flop, target)
            lines.append(
                f"| {spec} | `{policy}` | {batch} @ {size} | {cnn:.3f} | {spread(ratios, 3)} | {flop:.3f} | "
                f"{median / flop:.3f} | {goal} | {verdict} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from " + ", ".join(CASES))
    parser.add_argument("--runs", type=int, default=3, help="independent runs, each a fresh process")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timed rounds per run")
    parser.add_argument("--json", help="also write every run's results to this JSON file")
    parser.add_argument(ONE_RUN, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = args.cases.split(",")
    if args.one_run:
        print(json.dumps({case: time_case(case, args.rounds) for case in cases}))
        return
    settings = ["--cases", args.cases, "--rounds", str(args.rounds)]
    runs = fresh_runs("benchmarks.inference_speed", settings, args.runs)
    machine = {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
               "torch": torch.__version__}  # fmt: skip
    print(json.dumps(machine))
    print(markdown(runs, cases))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine, "command": settings, "runs": runs}, out, indent=2)


if __name__ == "__main__":
    main()
