"""``tcnn-fx analyze HYBRID --data DIR``: content weights and attention distances of the converted layers."""

from __future__ import annotations

import json

import torch

from tcnn_fx.cli.arguments import add_model_arguments, positive_int
from tcnn_fx.cli.common import (
    add_report_outputs,
    check_report_outputs,
    console,
    evaluation_split,
    load_model,
    model_and_policy,
    outputs,
)

SEED = "the image sample (balanced over classes) and, for a spec MODEL, its random initial weights"


def add_parser(commands) -> None:
    sub = commands.add_parser("analyze", help="gates and attention distances of a hybrid's converted layers")
    add_model_arguments(sub, seed=SEED)
    sub.add_argument("--data", required=True, metavar="DIR",
                     help="dataset folder or .tar; images come from its val/ (or test/) split")  # fmt: skip
    sub.add_argument("--images", type=positive_int, default=256,
                     help="how many images, balanced over classes (default 256)")  # fmt: skip
    add_report_outputs(sub, "also write the table as JSON", "also write a PNG plot (needs matplotlib)")
    sub.set_defaults(run=run)


def run(args) -> None:
    from tcnn_fx import analysis
    from tcnn_fx.training import balanced_subset

    check_report_outputs(args)
    split, _ = evaluation_split(args)
    model, _ = load_model(args)
    per_class = max(1, args.images // len(split.classes))
    images = torch.stack([split[i][0] for i in balanced_subset(split.targets, per_class, seed=args.seed)])
    with console.status(f"measuring attention on {len(images)} images"):
        rows = analysis.analyze_attention(model, images)
    console.print(analysis.table(rows), markup=False)
    with outputs() as files:
        if args.json:
            record = {"model": args.model, "images": len(images), "layers": [r.to_dict() for r in rows]}
            files.write_text(args.json, json.dumps(record, indent=2) + "\n")
        if args.plot:
            spec, policy = model_and_policy(args.model)
            analysis.plot(rows, files.stage(args.plot), model=spec, policy=policy, images=len(images))
