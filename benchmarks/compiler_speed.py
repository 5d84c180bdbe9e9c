"""Compiler cost, measured side by side in one run.

Rewrite time of ResNet-152 (policy ``stage3+4``) against a bare
``torch.fx.symbolic_trace`` plus shape propagation of the same model (target:
at most 2x).  The hybrids' latency is ``benchmarks/inference_speed.py``'s.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    start = time.perf_counter()
    results = {"rewrite": rewrite_cost(args.rounds), "threads": torch.get_num_threads()}
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
