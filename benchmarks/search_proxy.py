"""How well the cheap accuracy proxy ranks candidates against the short fine-tune (Spearman and Kendall).

A fixed random sample of masks of a real space (CIFAR ResNet-20, pretrained
weights from ``shared/weights``, the shared CIFAR-10) is measured twice with
``CandidateEvaluator``: the short fine-tune the search uses by default, and the
proxy (one epoch on a few images per class).  Both evaluate on the same
class-balanced test sample.

    python benchmarks/search_proxy.py --shared ../shared --json docs/results/search_proxy.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from tcnn_fx.search import SearchSpace
from tcnn_fx.search.evaluate import CandidateEvaluator
from tcnn_fx.specs import load_model
from tcnn_fx.training import Preprocessing, Recipe, balanced_subset, load_splits


def ranks(values: list[float]) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's rho)."""
    order = np.argsort(values, kind="stable")
    result = np.empty(len(values))
    result[order] = np.arange(len(values), dtype=float)
    for value in set(values):
        tied = [i for i, v in enumerate(values) if v == value]
        result[tied] = result[tied].mean()
    return result


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho; None when one side ranks every candidate equal (no ranking to correlate)."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def kendall(a: list[float], b: list[float]) -> float:
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    score = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs)
    return float(score / len(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--masks", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=300, help="short fine-tune: images per class, one epoch")
    parser.add_argument("--proxy-per-class", type=int, default=20, help="proxy: images per class, one epoch")
    parser.add_argument("--eval-per-class", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("cifar:resnet20", next((args.shared / "weights").glob("resnet20-*.th"))).eval()
    inputs = (torch.zeros(1, 3, 32, 32),)
    space = SearchSpace.build(model, inputs, "stage>=1", "block")
    train, evaluation = load_splits(args.shared / "data" / "cifar10-jpeg.tar", Preprocessing(32), in_memory=True)
    evaluation = Subset(evaluation, balanced_subset(evaluation.targets, args.eval_per_class, seed=0))
    recipe = Recipe(epochs=1, batch_size=64, lr=0.01, warmup_epochs=0.2, workers=0)
    rng = random.Random(0)
    masks = [tuple(rng.random() < 0.5 for _ in space.groups) for _ in range(args.masks)]
    results = {}
    for mode, per_class in (("finetune", args.train_per_class), ("proxy", args.proxy_per_class)):
        subset = Subset(train, balanced_subset(train.targets, per_class, seed=0))
        evaluator = CandidateEvaluator(model, inputs, space, subset, evaluation, recipe)
        began = time.perf_counter()
        results[mode] = [evaluator(mask, "accuracy") for mask in masks]
        results[f"{mode}_seconds"] = (time.perf_counter() - began) / len(masks)
        print(
            mode, [round(v, 4) for v in results[mode]], f"{results[f'{mode}_seconds']:.1f} s per candidate", flush=True
        )
    summary = {
        "space": f"{len(space.groups)} blocks of ResNet-20 stages 1-2", "masks": ["".join("1" if m else "0" for m in k) for k in masks],
        **results, "spearman": spearman(results["finetune"], results["proxy"]), "kendall": kendall(results["finetune"], results["proxy"]),
        "settings": vars(args) | {"shared": str(args.shared), "json": str(args.json)},
    }  # fmt: skip
    print(f"Spearman {summary['spearman']}, Kendall {summary['kendall']:.3f} over {len(masks)} candidates")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
