"""The ViT experiments of docs/results/vit_cifar10.md: attention initialisation and stem, trained from scratch.

A small ViT (``benchmarks/vit_models.py:vit_cifar``: 128 wide, 6 blocks, 4x4
patches) trained from random weights on a fixed 10,000-image subset of the
shared CIFAR-10 for a fixed short budget, one recipe for every variant:

* patchify stem with the default (timm) init, impulse init (positional
  embedding rescaled to the patch tokens' RMS, and as initialised), mimetic
  init, and the default init with the rescaled positions (the control for the
  rescaling);
* convolutional stem (last block removed, as the paper does) with the default
  and the impulse init;
* 9 heads of 16 (144 wide), default init and impulse init with one head per
  tap of the 3x3 window (``--impulse-order fixed``).

Phases: ``train`` (resumable; skips finished runs), ``measure`` (attention mass
on the impulse targets at init: positions alone and in the model on 512 test
images, and after training), ``summary`` (tables, JSON and the training-curve
plot).

    python benchmarks/vit_experiments.py --shared ../shared --out runs/vit --phase train measure
    python benchmarks/vit_experiments.py --shared ../shared --out runs/vit --phase summary \
        --markdown docs/results/vit_cifar10_tables.md --json docs/results/vit_cifar10.json \
        --plot docs/results/vit_cifar10_curves.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from cifar_experiments import _mean_std, _records, run_chain

MODEL = str(Path(__file__).with_name("vit_models.py")) + ":vit_cifar"
#: One head per tap: does covering the whole 3x3 window change the impulse init's result?
NINE_HEADS = str(Path(__file__).with_name("vit_models.py")) + ":vit_cifar_9heads"
RECIPE = ["--input-size", "32", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "--warmup-epochs", "1", "--epochs", "8",
          "--batch-size", "128", "--train-subset", "1000"]  # fmt: skip
IMPULSE = ["--attention-init", "impulse", "--impulse-kernel", "3"]
VARIANTS = {  # name: (model, arguments)
    "patchify-default": (MODEL, []),
    "patchify-impulse": (MODEL, [*IMPULSE, "--position-scale", "1"]),
    "patchify-impulse-unscaled": (MODEL, IMPULSE),
    "patchify-default-scaled": (MODEL, ["--position-scale", "1"]),
    "patchify-mimetic": (MODEL, ["--attention-init", "mimetic"]),
    "convstem-default": (MODEL, ["--conv-stem", "--remove-block"]),
    "convstem-impulse": (MODEL, ["--conv-stem", "--remove-block", *IMPULSE, "--position-scale", "1"]),
    "9heads-default": (NINE_HEADS, []),
    "9heads-impulse-fixed": (NINE_HEADS, [*IMPULSE, "--impulse-order", "fixed", "--position-scale", "1"]),
}
SEEDS = (0, 1)


def train_runs(out: Path, data: str) -> list[tuple[Path, list[str]]]:
    return [
        (out / f"{variant}-seed{seed}", ["finetune", model, "--data", data, "--seed", str(seed), *RECIPE, *extra])
        for seed in SEEDS
        for variant, (model, extra) in VARIANTS.items()
    ]


def _test_images(data: str, count: int) -> torch.Tensor:
    from tcnn_fx.training import ImageFolderData, Preprocessing, balanced_subset, find_splits

    split = ImageFolderData(find_splits(data)[1], Preprocessing(32).eval())
    chosen = balanced_subset(split.targets, count // len(split.classes), seed=0)
    return torch.stack([split[i][0] for i in chosen])


def measure(out: Path, data: str) -> None:
    """Impulse-target attention mass at init (positions alone, in the model) and after training, per run."""
    import tcnn_fx
    from tcnn_fx.passes.attention_init import impulse_init, measure_target_mass
    from tcnn_fx.passes.conv_stem import conv_stem
    from tcnn_fx.specs import build

    images = _test_images(data, 512)
    for variant, (spec, extra) in VARIANTS.items():
        if "impulse" not in variant:
            continue
        for seed in SEEDS:
            run = out / f"{variant}-seed{seed}"
            if not (run / "model.pt").exists() or (run / "mass.json").exists():
                continue
            torch.manual_seed(seed)  # as the CLI builds it: same weights, same example input
            model = build(spec).eval()
            inputs = (torch.randn(1, 3, 32, 32),)
            baseline = model
            if "--conv-stem" in extra:
                model, _ = conv_stem(model, inputs, remove_block=True)
                baseline = model
            scale = float(extra[extra.index("--position-scale") + 1]) if "--position-scale" in extra else None
            order = extra[extra.index("--impulse-order") + 1] if "--impulse-order" in extra else "random"
            model, report = impulse_init(model, inputs, kernel_size=3, order=order, position_scale=scale, seed=seed)
            trained = tcnn_fx.load(run / "model.pt").eval()
            result = {
                "positions_alone": {layer.name: list(layer.position_mass) for layer in report.layers},
                "default_init": measure_target_mass(baseline, report, images),
                "at_init": measure_target_mass(model, report, images),
                "trained": measure_target_mass(trained, report, images),
                "offsets": {layer.name: [list(o) for o in layer.offsets] for layer in report.layers},
            }
            (run / "mass.json").write_text(json.dumps(result, indent=1) + "\n")
            print(f"measured {run.name}", flush=True)


def _mean_mass(per_layer: dict[str, list[float]]) -> float:
    return statistics.mean(statistics.mean(v) for v in per_layer.values())


def summarize(out: Path, markdown: Path | None, json_path: Path | None, plot: Path | None) -> str:
    results: dict = {}
    for variant in VARIANTS:
        for seed in SEEDS:
            run = out / f"{variant}-seed{seed}"
            if not (run / "model.pt").exists():
                continue
            records = _records(run)
            row = {"seed": seed, "top1": records[-1]["val_top1"], "curve": [r["val_top1"] for r in records],
                   "seconds": sum(r["seconds"] for r in records[1:])}  # fmt: skip
            if (run / "mass.json").exists():
                row["mass"] = json.loads((run / "mass.json").read_text())
            results.setdefault(variant, []).append(row)
    lines = ["| variant | seeds | final top-1 (%) | top-1 after each epoch (mean over seeds, %) | training s (mean) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for variant, rows in results.items():
        curve = [statistics.mean(v) for v in zip(*(r["curve"] for r in rows), strict=True)]
        lines.append(f"| {variant} | {len(rows)} | {_mean_std([r['top1'] for r in rows])} | "
                     f"{', '.join(f'{100 * v:.1f}' for v in curve)} | {statistics.mean(r['seconds'] for r in rows):.0f} |")  # fmt: skip
    measured = {v: [r["mass"] for r in rows if "mass" in r] for v, rows in results.items()}
    if any(measured.values()):
        lines += ["", ("Mean attention mass on each head's impulse target (mean over layers, heads and seeds; "
                       "uniform attention would give 1/65 = 0.015):"), "",
                  "| variant | positions alone | default init, in the model | impulse init, in the model | after training |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for variant, masses in measured.items():
            if masses:
                cells = [statistics.mean(_mean_mass(m[key]) for m in masses)
                         for key in ("positions_alone", "default_init", "at_init", "trained")]  # fmt: skip
                lines.append(f"| {variant} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    if markdown:
        markdown.write_text(text)
    if json_path:
        json_path.write_text(json.dumps(results, indent=1) + "\n")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4.5))
        for variant, rows in results.items():
            curve = [100 * statistics.mean(v) for v in zip(*(r["curve"] for r in rows), strict=True)]
            axis.plot(range(len(curve)), curve, marker="o", label=f"{variant} (n={len(rows)})")
        axis.set(xlabel="epoch", ylabel="CIFAR-10 test top-1 (%)", title="ViT from scratch, 10k CIFAR-10 images")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(plot, dpi=120)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path("runs/vit"))
    parser.add_argument("--phase", nargs="+", choices=("train", "measure", "summary"), required=True)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    data = str(args.shared / "data" / "cifar10-jpeg.tar")
    for phase in args.phase:
        if phase == "train":
            threads = max(1, (os.cpu_count() or 1) // args.jobs)
            with ThreadPoolExecutor(args.jobs) as pool:
                runs = [pool.submit(run_chain, [run], threads, args.dry_run) for run in train_runs(args.out, data)]
                for future in runs:
                    future.result()
        elif phase == "measure":
            measure(args.out, data)
        else:
            print(summarize(args.out, args.markdown, args.json, args.plot))


if __name__ == "__main__":
    sys.exit(main())
