"""How well the closed-form impulse solve makes heads attend to their offsets, across ViTs, targets and scales.

For each model (random weights, as built), target and number of refinement
steps (0: the closed form alone), the mean over layers
and heads of the attention mass on each head's target token: with the
positional embeddings alone (what the solve fits), and inside the model on
images, with the positional embedding as initialised and rescaled to the
patch tokens' RMS (``position_scale`` 1 and 3).  Images: the shared CIFAR-10 test
set for the 32x32 model, Gaussian noise for the 224x224 ones (no ImageNet here).

    python benchmarks/impulse_solve.py --shared ../shared --json docs/results/impulse_solve.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from vit_models import vit_cifar

from tcnn_fx.passes.attention_init import impulse_init, measure_target_mass
from tcnn_fx.specs import build

#: (target, refine_steps): the closed form alone and refined, for the default target; the distance target alone.
VARIANTS = (("onehot", 0), ("onehot", 100), ("distance", 0))
#: Positional embedding rescaled to these multiples of the patch tokens' RMS.
SCALES = (1.0, 3.0)


def _mean(values) -> float:
    return statistics.mean(statistics.mean(v) for v in values)


def _cifar_images(shared: Path, count: int) -> torch.Tensor:
    from tcnn_fx.training import ImageFolderData, Preprocessing, balanced_subset, find_splits

    split = ImageFolderData(find_splits(shared / "data" / "cifar10-jpeg.tar")[1], Preprocessing(32).eval())
    return torch.stack([split[i][0] for i in balanced_subset(split.targets, count // 10, seed=0)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {
        "vit_cifar (128 wide, 8x8 grid, head_dim 32)": (vit_cifar, _cifar_images(args.shared, 256)),
        "timm vit_tiny_patch16_224 (192, 14x14, 64)": (lambda: build("timm:vit_tiny_patch16_224"), torch.randn(8, 3, 224, 224)),
        "timm vit_small_patch16_224 (384, 14x14, 64)": (lambda: build("timm:vit_small_patch16_224"), torch.randn(8, 3, 224, 224)),
        "torchvision vit_b_16 (768, 14x14, 64)": (lambda: build("torchvision:vit_b_16"), torch.randn(4, 3, 224, 224)),
    }  # fmt: skip
    rows = []
    for name, (factory, images) in models.items():
        model = factory().eval()
        inputs = (images[:1],)
        for target, refine in VARIANTS:
            plain, report = impulse_init(model, inputs, target=target, refine_steps=refine)
            row = {
                "model": name,
                "target": target,
                "strength": report.settings["strength"],
                "refine_steps": refine,
                "positions_alone": _mean(layer.position_mass for layer in report.layers),
                "default_init_in_model": _mean(measure_target_mass(model, report, images).values()),
                "in_model": _mean(measure_target_mass(plain, report, images).values()),
            }
            for scale in SCALES:
                scaled, scaled_report = impulse_init(
                    model, inputs, target=target, refine_steps=refine, position_scale=scale
                )
                row[f"in_model_position_scale_{scale:g}"] = _mean(
                    measure_target_mass(scaled, scaled_report, images).values()
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    scaled = " | ".join(f"impulse + position_scale={s:g}, in model" for s in SCALES)
    print(
        f"\n| model | target (strength), refine steps | positions alone | default init, in model | impulse, in model | {scaled} |"
    )
    print("|---|---|---|---|---|" + "---|" * len(SCALES))
    for r in rows:
        cells = [r["positions_alone"], r["default_init_in_model"], r["in_model"]]
        cells += [r[f"in_model_position_scale_{s:g}"] for s in SCALES]
        solve = f"{r['target']} ({r['strength']:g}), {r['refine_steps']}"
        print(f"| {r['model']} | {solve} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
