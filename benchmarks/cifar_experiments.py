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
* ``summary``: the tables of docs/results/cifar10.md (``--markdown``), their numbers (``--json``) and, beside
  the tables, the attention figures of the seed-0 hybrids.
* ``figures``: only those attention figures, into ``--figures``.

Runs go ``--jobs`` at a time, the CPU threads shared evenly between them.

    python benchmarks/cifar_experiments.py --shared ../shared --out runs/cifar10 --phase finetune scratch
    python benchmarks/cifar_experiments.py --shared ../shared --out runs/cifar10 --phase evaluate analyze
    python benchmarks/cifar_experiments.py --out runs/cifar10 --phase summary \
        --markdown docs/results/cifar10_tables.md --json docs/results/cifar10.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: One recipe for every fine-tuning run (CNN and hybrid alike): 2 epochs over 1,000 images per class.
FINETUNE = ["--epochs", "2", "--train-subset", "1000", "--lr", "0.01", "--warmup-epochs", "0.5"]
#: Training from scratch: the same data, a from-scratch learning rate; BUDGET epochs in all.
SCRATCH = ["--train-subset", "1000", "--lr", "0.1", "--warmup-epochs", "0.5"]
BUDGET = 4
#: The hybrids' policy: the 8x8 stage, as in the paper (its last stage).
HYBRID_POLICY = "last"
SEEDS = {"finetune": (0, 1, 2), "scratch": (0, 1)}
COMMON = ["--in-memory", "--workers", "0", "--quiet"]


def finetune_runs(shared: Path, out: Path, data: str) -> list[tuple[Path, list[str]]]:
    runs = []
    for depth in (20, 56):
        weights = next((shared / "weights").glob(f"resnet{depth}-*.th"))
        for policy in ("none", HYBRID_POLICY):
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


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def _finetune_results(out: Path) -> dict:
    results: dict = {}
    for run in sorted((out / "finetune").glob("resnet*-seed*")):
        if not (run / "model.pt").exists():
            continue
        model, kind, seed = run.name.split("-")
        records = _records(run)
        row = {"seed": int(seed.removeprefix("seed")), "epoch0_top1": records[0]["val_top1"], "top1": records[-1]["val_top1"],
               "images_per_second": statistics.mean(r["images_per_second"] for r in records[1:])}  # fmt: skip
        robust = run / "robustness" / "result.json"
        if robust.exists():
            data = json.loads(robust.read_text())
            row |= {"corruption_top1": data["mean_corruption_top1"], "per_corruption": data["per_corruption"]}
        results.setdefault(model, {}).setdefault(kind, []).append(row)
    return results


def _scratch_results(out: Path) -> dict:
    results: dict = {}
    for run in sorted((out / "scratch").glob("*-seed*")):
        if not (run / "model.pt").exists():
            continue
        name, seed = run.name.rsplit("-seed", 1)
        records = _records(run)
        results.setdefault(name, []).append({"seed": int(seed), "top1": records[-1]["val_top1"],
                                             "seconds": sum(r["seconds"] for r in records[1:]),
                                             "curve": [r["val_top1"] for r in records]})  # fmt: skip
    return results


def _attention_results(out: Path) -> dict:
    results: dict = {}
    for path in sorted((out / "finetune").glob("*-hybrid-seed*/attention/result.json")):
        model = path.parent.parent.name.split("-")[0]
        for layer in json.loads(path.read_text())["layers"]:
            entry = results.setdefault(model, {}).setdefault(layer["name"], {"content_weight": [], "distance": [],
                                                                            "positional": [], "content": []})  # fmt: skip
            entry["content_weight"].append(layer["mean_content_weight"])
            entry["distance"].append(layer["mean_distance"])
            entry["positional"].append(statistics.mean(layer["positional_distance"]))
            entry["content"].append(statistics.mean(layer["content_distance"]))
    return results


def attention_figures(out: Path, folder: Path) -> list[Path]:
    """``cifar10_attention_<model>.png`` in ``folder``: the seed-0 hybrid of each model, from its analysis JSON.

    Drawn here rather than copied from ``tcnn-fx analyze --plot`` so that the
    title names the model and the policy of the run, not where it was saved.
    """
    from tcnn_fx import analysis

    figures = []
    for path in sorted((out / "finetune").glob("*-hybrid-seed0/attention/result.json")):
        model = path.parent.parent.name.split("-")[0]
        data = json.loads(path.read_text())
        rows = [analysis.LayerAttention.from_dict(layer) for layer in data["layers"]]
        figure = folder / f"cifar10_attention_{model}.png"
        analysis.plot(
            rows, figure, model=f"cifar:{model} fine-tuned (seed 0)", policy=HYBRID_POLICY, images=data["images"]
        )
        figures.append(figure)
    return figures


def summarize(out: Path, markdown: Path | None, json_path: Path | None) -> str:
    """Markdown tables of every finished run (and their numbers as JSON)."""
    finetune, scratch, attention = _finetune_results(out), _scratch_results(out), _attention_results(out)
    lines = ["### Fine-tuning the pretrained CNN vs its hybrid (same recipe, top-1 %, mean ± std over seeds)", "",
             "| model | variant | seeds | top-1 before any step | clean top-1 | mean corruption top-1 | train images/s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for model, kinds in finetune.items():
        for kind, rows in sorted(kinds.items()):
            corrupted = [r["corruption_top1"] for r in rows if "corruption_top1" in r]
            lines.append(f"| {model} | {kind} | {len(rows)} | {_mean_std([r['epoch0_top1'] for r in rows])} | "
                         f"{_mean_std([r['top1'] for r in rows])} | {_mean_std(corrupted)} | "
                         f"{statistics.mean(r['images_per_second'] for r in rows):.0f} |")  # fmt: skip
    lines += ["", "Paired by seed (hybrid minus CNN, points):", "",
              "| model | clean top-1 difference | mean corruption top-1 difference |", "|---|---|---|"]  # fmt: skip
    for model, kinds in finetune.items():
        pairs = [(c, h) for c in kinds.get("cnn", []) for h in kinds.get("hybrid", []) if c["seed"] == h["seed"]]
        clean = [h["top1"] - c["top1"] for c, h in pairs]
        robust = [
            h["corruption_top1"] - c["corruption_top1"]
            for c, h in pairs
            if "corruption_top1" in c and "corruption_top1" in h
        ]
        lines.append(f"| {model} | {_mean_std(clean)} (n={len(clean)}) | {_mean_std(robust)} (n={len(robust)}) |")
    corruption_names = sorted(
        {n for kinds in finetune.values() for rows in kinds.values() for r in rows for n in r.get("per_corruption", {})}
    )
    if corruption_names:
        lines += ["", "### Top-1 per corruption (mean over severities and seeds, %)", "",
                  "| model | variant | " + " | ".join(corruption_names) + " |", "|---|---|" + "---|" * len(corruption_names)]  # fmt: skip
        for model, kinds in finetune.items():
            for kind, rows in sorted(kinds.items()):
                rows = [r for r in rows if "per_corruption" in r]
                if rows:
                    cells = [
                        f"{100 * statistics.mean(r['per_corruption'][n] for r in rows):.1f}" for n in corruption_names
                    ]
                    lines.append(f"| {model} | {kind} | " + " | ".join(cells) + " |")
    if scratch:
        lines += ["", f"### From scratch: CNN for {BUDGET // 2} epochs then hybrid for {BUDGET // 2}, vs {BUDGET} epochs of one model (ResNet-20)", "",
                  "| run | seeds | final top-1 | top-1 after each epoch (mean over seeds) | training seconds (mean) |", "|---|---|---|---|---|"]  # fmt: skip
        for name, rows in scratch.items():
            curve = [statistics.mean(values) for values in zip(*(r["curve"] for r in rows), strict=True)]
            lines.append(f"| {name} | {len(rows)} | {_mean_std([r['top1'] for r in rows])} | "
                         f"{', '.join(f'{100 * v:.1f}' for v in curve)} | {statistics.mean(r['seconds'] for r in rows):.0f} |")  # fmt: skip
    if attention:
        lines += ["", "### Attention of the fine-tuned hybrids (mean over heads, then over seeds)", "",
                  "| model | layer | content weight | applied distance (px) | positional part (px) | content part (px) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for model, layers in attention.items():
            for layer, e in layers.items():
                lines.append(f"| {model} | {layer} | {statistics.mean(e['content_weight']):.4f} | {statistics.mean(e['distance']):.3f} | "
                             f"{statistics.mean(e['positional']):.3f} | {statistics.mean(e['content']):.3f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    if markdown:
        markdown.write_text(text)
        attention_figures(out, markdown.parent)
    if json_path:
        json_path.write_text(
            json.dumps({"finetune": finetune, "scratch": scratch, "attention": attention}, indent=1) + "\n"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path("runs/cifar10"))
    parser.add_argument(
        "--phase",
        nargs="+",
        choices=("finetune", "scratch", "evaluate", "analyze", "summary", "figures"),
        required=True,
    )
    parser.add_argument("--markdown", type=Path, help="summary: write the tables here")
    parser.add_argument("--json", type=Path, help="summary: write the numbers here")
    parser.add_argument("--figures", type=Path, default=Path("docs/results"), help="figures: write them here")
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
        elif phase == "summary":
            print(summarize(args.out, args.markdown, args.json))
        elif phase == "figures":
            print("\n".join(map(str, attention_figures(args.out, args.figures))))
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
