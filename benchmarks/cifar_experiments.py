"""The CIFAR-10 experiments of docs/results/cifar10.md, as the ``tcnn-fx`` commands that produce them.

Phases (each skips runs already finished, and resumes interrupted ones):

* ``finetune``: the pretrained ResNet-20 and ResNet-56 of ``shared/weights``,
  fine-tuned as CNNs (``--policy none``) and as hybrids (``--policy last``,
  the 8x8 stage) with one recipe, several seeds.
* ``scratch``: ResNet-20 from random weights: a CNN trained for half the
  budget then converted and fine-tuned for the other half, against the
  hybrid (and the CNN) trained from scratch for the whole budget.
* ``evaluate``: clean and corrupted top-1 of every trained model.
* ``analyze``: gates and attention distances of every trained hybrid.

Runs go ``--jobs`` at a time, the CPU threads shared evenly between them.

    python benchmarks/cifar_experiments.py --shared ../shared --out runs/cifar10 --phase finetune scratch
    python benchmarks/cifar_experiments.py --shared ../shared --out runs/cifar10 --phase evaluate analyze --summary docs/results/cifar10.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: One recipe for every fine-tuning run (CNN and hybrid alike): 2 epochs over 1,000 images per class.
FINETUNE = ["--epochs", "2", "--train-subset", "1000", "--lr", "0.01", "--warmup-epochs", "0.5"]
#: Training from scratch: the same data, a from-scratch learning rate; BUDGET epochs in all.
SCRATCH = ["--train-subset", "1000", "--lr", "0.1", "--warmup-epochs", "0.5"]
BUDGET = 4
SEEDS = {"finetune": (0, 1, 2), "scratch": (0, 1)}
COMMON = ["--in-memory", "--workers", "0", "--quiet"]


def finetune_runs(shared: Path, out: Path, data: str) -> list[tuple[Path, list[str]]]:
    runs = []
    for depth in (20, 56):
        weights = next((shared / "weights").glob(f"resnet{depth}-*.th"))
        for policy in ("none", "last"):
            for seed in SEEDS["finetune"]:
                run = out / "finetune" / f"resnet{depth}-{'cnn' if policy == 'none' else 'hybrid'}-seed{seed}"
                runs.append((run, ["finetune", f"cifar:resnet{depth}", "--weights", str(weights), "--policy", policy,
                                   "--data", data, "--seed", str(seed), *FINETUNE]))  # fmt: skip
    return runs


def scratch_runs(out: Path, data: str) -> list[list[tuple[Path, list[str]]]]:
    """Chains of runs (a chain runs in order; chains run in parallel)."""
    chains = []
    half = str(BUDGET // 2)
    for seed in SEEDS["scratch"]:
        base = out / "scratch"
        common = ["--data", data, "--seed", str(seed), *SCRATCH]
        cnn_half = base / f"cnn-{half}ep-seed{seed}"
        chains.append([
            (cnn_half, ["finetune", "cifar:resnet20", "--policy", "none", "--epochs", half, *common]),
            (base / f"cnn{half}ep-then-hybrid{half}ep-seed{seed}",
             ["finetune", "cifar:resnet20", "--weights", str(cnn_half / "model.pt"), "--policy", "last", "--epochs", half, *common]),
        ])  # fmt: skip
        for policy, name in (("last", "hybrid"), ("none", "cnn")):
            run = base / f"{name}-{BUDGET}ep-seed{seed}"
            chains.append([(run, ["finetune", "cifar:resnet20", "--policy", policy, "--epochs", str(BUDGET), *common])])
    return chains


def trained_models(out: Path) -> list[Path]:
    return sorted(out.glob("*/*/model.pt"))


def evaluate_runs(out: Path, data: str) -> list[tuple[Path, list[str]]]:
    """The fine-tuned models (not the short from-scratch ones) under corruptions, 300 images per corrupted set."""
    return [(model.parent / "robustness", ["evaluate", str(model), "--data", data, "--json",
             str(model.parent / "robustness" / "result.json"), "--per-class", "30", "--quiet"])
            for model in trained_models(out) if model.parent.parent.name == "finetune"]  # fmt: skip


def analyze_runs(out: Path, data: str) -> list[tuple[Path, list[str]]]:
    return [(model.parent / "attention", ["analyze", str(model), "--data", data, "--json",
             str(model.parent / "attention" / "result.json"), "--plot", str(model.parent / "attention" / "attention.png")])
            for model in trained_models(out) if "hybrid" in model.parent.name]  # fmt: skip


def run_chain(chain: list[tuple[Path, list[str]]], threads: int, dry: bool) -> None:
    for folder, arguments in chain:
        done = folder / ("model.pt" if arguments[0] == "finetune" else "result.json")
        if done.exists():
            continue
        if arguments[0] == "finetune":
            arguments = [*arguments, "--out", str(folder), *COMMON]
            if (folder / "last.pt").exists():
                arguments.append("--resume")
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tcnn_fx.cli", *arguments]
        print(f"$ OMP_NUM_THREADS={threads} tcnn-fx {shlex.join(arguments)}", flush=True)
        if dry:
            continue
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(folder / "log.txt", "a") as log:
            subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path("runs/cifar10"))
    parser.add_argument("--phase", nargs="+", choices=("finetune", "scratch", "evaluate", "analyze"), required=True)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args()
    data = str(args.shared / "data" / "cifar10-jpeg.tar")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    chains: list[list[tuple[Path, list[str]]]] = []
    for phase in args.phase:
        if phase == "finetune":
            chains += [[run] for run in finetune_runs(args.shared, args.out, data)]
        elif phase == "scratch":
            chains += scratch_runs(args.out, data)
        elif phase == "evaluate":
            chains += [[run] for run in evaluate_runs(args.out, data)]
        else:
            chains += [[run] for run in analyze_runs(args.out, data)]
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(run_chain, chain, threads, args.dry_run) for chain in chains]:
            future.result()
    print(json.dumps({"finished": len(chains)}))


if __name__ == "__main__":
    main()
