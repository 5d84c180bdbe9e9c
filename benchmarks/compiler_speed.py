"""Compiler cost and hybrid latency, each measured side by side in one run.

1. Rewrite time of ResNet-152 (policy ``stage3+4``) against a bare
   ``torch.fx.symbolic_trace`` plus shape propagation of the same model
   (target: at most 2x).
2. Whole-model latency of ResNet-50 at 224, batch 8, float32, PyTorch eager on
   the CPU: hybrid / CNN for ``stage4`` and ``stage3+4`` (targets 1.06 and
   1.45), interleaved with the CNN in one run.

    python benchmarks/compiler_speed.py [--rounds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision
from torch.fx.passes.shape_prop import ShapeProp

import tcnn_fx
from tcnn_fx.timing import time_side_by_side


def rewrite_cost(rounds: int) -> dict:
    model = torchvision.models.resnet152().eval()
    x = torch.randn(1, 3, 224, 224)

    def baseline():
        graph_module = torch.fx.symbolic_trace(model)
        ShapeProp(graph_module).propagate(x)

    timing = time_side_by_side(
        {"symbolic_trace+ShapeProp": baseline, "rewrite": lambda: tcnn_fx.rewrite(model, "stage3+4", (x,))},
        warmup=1,
        rounds=rounds,
    )
    return {name: t.median for name, t in timing.items()} | {
        "ratio": timing["rewrite"].median / timing["symbolic_trace+ShapeProp"].median
    }


def latency(rounds: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(8, 3, 224, 224)
    hybrids = {policy: tcnn_fx.rewrite(model, policy, (x,)).eval() for policy in ("stage4", "stage3+4")}
    with torch.no_grad():
        timing = time_side_by_side(
            {"cnn": lambda: model(x)} | {p: (lambda h=h: h(x)) for p, h in hybrids.items()}, warmup=2, rounds=rounds
        )
    result = {"cnn_s": timing["cnn"].median}
    for policy, hybrid in hybrids.items():
        report = tcnn_fx.report_of(hybrid)
        result[policy] = {
            "hybrid_s": timing[policy].median,
            "latency_ratio": timing[policy].median / timing["cnn"].median,
            "flop_ratio": report.flop_ratio,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    start = time.perf_counter()
    results = {"rewrite": rewrite_cost(args.rounds), "latency": latency(args.rounds), "threads": torch.get_num_threads()}
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
