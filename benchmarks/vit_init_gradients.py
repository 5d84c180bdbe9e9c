"""Query/key gradients at initialisation of the ViT CIFAR-10 variants: is the impulse init saturated?

For seeds 0 and 1, the model of ``benchmarks/vit_models.py`` as the
experiments build it, one forward/backward pass (cross-entropy, train mode)
on 250 CIFAR-10 test images (25 per class); per block, the norm of the
query/key weights' gradient relative to the weights' norm.

    python benchmarks/vit_init_gradients.py --shared ../shared
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from vit_experiments import MODEL

from tcnn_fx.passes.attention_init import impulse_init, mimetic_init, scale_positions
from tcnn_fx.specs import build
from tcnn_fx.training import ImageFolderData, Preprocessing, balanced_subset, find_splits


def relative_query_key_gradients(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    model.train()
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    ratios = []
    for block in model.blocks:
        weight = block.attn.qkv.weight
        rows = 2 * weight.shape[1]  # queries and keys
        ratios.append(float(weight.grad[:rows].norm() / weight.detach()[:rows].norm()))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    args = parser.parse_args()
    split = ImageFolderData(find_splits(args.shared / "data" / "cifar10-jpeg.tar")[1], Preprocessing(32).eval())
    chosen = balanced_subset(split.targets, 25, seed=0)
    images = torch.stack([split[i][0] for i in chosen])
    labels = torch.tensor([split.targets[i] for i in chosen])
    print("| variant | seed | relative query/key gradient per block |\n|---|---|---|")
    for seed in (0, 1):
        torch.manual_seed(seed)  # as the command line builds it
        model = build(MODEL)
        inputs = (torch.randn(1, 3, 32, 32),)
        scaled, _ = scale_positions(model, inputs, 1.0)
        variants = {
            "default": model,
            "default, positions rescaled": scaled,
            "impulse, positions rescaled": impulse_init(scaled, inputs, seed=seed)[0],
            "impulse, positions as drawn": impulse_init(model, inputs, seed=seed)[0],
            "mimetic": mimetic_init(model, seed=seed)[0],
        }
        for name, variant in variants.items():
            ratios = relative_query_key_gradients(variant, images, labels)
            print(f"| {name} | {seed} | " + " ".join(f"{r:.1e}" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
