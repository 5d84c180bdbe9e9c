"""How close the search gets to the exact Pareto front of a space small enough to enumerate.

The space: the 12 convertible sites of CIFAR ResNet-20's stages 2 and 3 (4,096
masks), exact FLOP ratios from the site table, and a fixed pseudo-accuracy
per mask (a seeded table of per-site gains and pairwise interactions, so the
front is neither empty nor trivial).  Brute force gives the exact front; each
sampler runs a quarter of the space's size in trials (1,024; a repeated mask
counts as a trial although the study serves it without evaluating), and the
hypervolume of the trials so far is recorded after every trial.

    python benchmarks/search_quality.py --json docs/results/search_quality.json --plot docs/results/search_quality.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from tcnn_fx.search import SearchSettings, SearchSpace, run_search
from tcnn_fx.search.front import hypervolume
from tcnn_fx.specs import load_model


class PseudoAccuracy:
    """accuracy(mask) = 0.85 + sum_i g_i m_i + sum_{i<j} J_ij m_i m_j, from a seeded table; counts evaluations."""

    def __init__(self, space: SearchSpace, seed: int = 0):
        rng = np.random.default_rng(seed)
        n = len(space.groups)
        self.space = space
        self.gains = rng.normal(0.004, 0.006, n)
        self.interactions = np.triu(rng.normal(0.0, 0.002, (n, n)), 1)
        self.evaluated: list[tuple[bool, ...]] = []

    def accuracy(self, mask: tuple[bool, ...]) -> float:
        m = np.array(mask, dtype=float)
        return float(0.85 + self.gains @ m + m @ self.interactions @ m)

    def __call__(self, mask: tuple[bool, ...], objective: str) -> float:
        assert objective == "accuracy"
        self.evaluated.append(mask)
        return self.accuracy(mask)


def space_of_resnet20() -> SearchSpace:
    return SearchSpace.build(load_model("cifar:resnet20").eval(), (torch.zeros(1, 3, 32, 32),), "stage>=2", "site")


def exact_front(space: SearchSpace, table: PseudoAccuracy) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    points = [
        (table.accuracy(m), space.flop_ratio(m)) for m in itertools.product((False, True), repeat=len(space.groups))
    ]
    reference = (min(a for a, _ in points), max(c for _, c in points))
    return points, reference


def run(space: SearchSpace, sampler: str, seed: int, budget: int, reference, storage_dir: Path) -> list[float]:
    """Hypervolume of the trials so far after each of ``budget`` trials (a repeated mask counts as a trial)."""
    table = PseudoAccuracy(space)
    settings = SearchSettings(
        objectives=("accuracy", "flop_ratio"), sampler=sampler, trials=budget, seed=seed, population=32
    )
    study = run_search(
        space, table, settings, str(storage_dir / f"{sampler}-{seed}.journal"), f"{sampler}-{seed}", progress=False
    )
    curve, seen = [], []
    for trial in study.trials:
        mask = tuple(c == "1" for c in trial.user_attrs["mask"])
        seen.append((table.accuracy(mask), space.flop_ratio(mask)))
        curve.append(hypervolume(seen, reference))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samplers", default="nsga2,tpe")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    space = space_of_resnet20()
    table = PseudoAccuracy(space)
    points, reference = exact_front(space, table)
    exact = hypervolume(points, reference)
    budget = space.size // 4
    results = {"space_size": space.size, "budget": budget, "exact_hypervolume": exact, "curves": {}}
    with tempfile.TemporaryDirectory() as storage_dir:
        for sampler in args.samplers.split(","):
            curves = [run(space, sampler, seed, budget, reference, Path(storage_dir)) for seed in range(args.seeds)]
            fractions = [[v / exact for v in curve] for curve in curves]
            results["curves"][sampler] = fractions
            final = [f[-1] for f in fractions]
            at = {k: [f[min(k, len(f)) - 1] for f in fractions] for k in (64, 128, 256, 512, budget)}
            print(f"{sampler}: hypervolume / exact after {budget} trials: {np.mean(final):.4f} "
                  f"(min {min(final):.4f}); " + ", ".join(f"{k}: {np.mean(v):.3f}" for k, v in at.items()))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
        for sampler, fractions in results["curves"].items():
            for i, f in enumerate(fractions):
                axis.plot(range(1, len(f) + 1), f, color="tab:blue" if sampler == "nsga2" else "tab:orange",
                          alpha=0.7, label=sampler if i == 0 else None)  # fmt: skip
        axis.axhline(0.95, color="grey", linestyle="--", label="95% of the exact front")
        axis.set(xscale="log", xlabel="trials", ylabel="hypervolume / exact front's",
                 title=f"{space.size} masks, budget {budget}")  # fmt: skip
        axis.legend()
        figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
