"""How well the cheap accuracy proxy ranks candidates against the short fine-tune (Spearman and Kendall).

Masks of a real space (CIFAR ResNet-20, pretrained weights from
``shared/weights``, the shared CIFAR-10; every mask when the space is small
enough, else a fixed random sample) are measured twice with
``CandidateEvaluator``: the short fine-tune and the proxy (one epoch on a
few images per class).  Both evaluate on the same class-balanced test
sample.  Rankings are compared on top-1 and on the test cross-entropy: when
candidates are one or two test images apart, top-1 ties and only the loss
still orders them.

    python benchmarks/search_proxy.py --shared ../shared --json docs/results/search_proxy.json
"""

from __future__ import annotations

import argparse
import itertools
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
    parser.add_argument("--base-policy", default="stage>=3", help="sites the space may convert (grouped per block)")
    parser.add_argument("--masks", type=int, default=10, help="random masks when the space has more than this many")
    parser.add_argument("--epochs", type=int, default=1, help="short fine-tune: epochs")
    parser.add_argument("--train-per-class", type=int, default=300, help="short fine-tune: images per class")
    parser.add_argument("--proxy-per-class", type=int, default=20, help="proxy: images per class, one epoch")
    parser.add_argument("--eval-per-class", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("cifar:resnet20", next((args.shared / "weights").glob("resnet20-*.th"))).eval()
    inputs = (torch.zeros(1, 3, 32, 32),)
    space = SearchSpace.build(model, inputs, args.base_policy, "block")
    train, evaluation = load_splits(args.shared / "data" / "cifar10-jpeg.tar", Preprocessing(32), in_memory=True)
    evaluation = Subset(evaluation, balanced_subset(evaluation.targets, args.eval_per_class, seed=0))
    if 2 ** len(space.groups) <= args.masks:
        masks = list(itertools.product((False, True), repeat=len(space.groups)))
    else:
        rng = random.Random(0)
        masks = [tuple(rng.random() < 0.5 for _ in space.groups) for _ in range(args.masks)]
    results = {}
    budgets = (("finetune", args.train_per_class, args.epochs), ("proxy", args.proxy_per_class, 1))
    for mode, per_class, epochs in budgets:
        recipe = Recipe(epochs=epochs, batch_size=64, lr=0.01, warmup_epochs=0.2, workers=0)
        subset = Subset(train, balanced_subset(train.targets, per_class, seed=0))
        evaluator = CandidateEvaluator(model, inputs, space, subset, evaluation, recipe)
        began = time.perf_counter()
        finals = [evaluator.finetuned(mask).history[-1] for mask in masks]
        results[mode] = {
            "top1": [f["val_top1"] for f in finals],
            "loss": [f["val_loss"] for f in finals],
            "seconds_per_candidate": (time.perf_counter() - began) / len(masks),
        }
        print(mode, {k: [round(v, 4) for v in results[mode][k]] for k in ("top1", "loss")}, flush=True)
    images = len(evaluation)
    summary = {
        "space": f"{len(space.groups)} blocks of ResNet-20 ('{args.base_policy}', grouped per block)",
        "masks": ["".join("1" if m else "0" for m in k) for k in masks],
        **results,
        "evaluation_images": images,
        "correlation": {
            metric: {
                "spearman": spearman(results["finetune"][metric], results["proxy"][metric]),
                "kendall": kendall(results["finetune"][metric], results["proxy"][metric]),
            }
            for metric in ("top1", "loss")
        },
        "settings": vars(args) | {"shared": str(args.shared), "json": str(args.json)},
    }
    for metric, values in summary["correlation"].items():
        print(f"{metric}: Spearman {values['spearman']}, Kendall {values['kendall']:.3f} over {len(masks)} candidates")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
