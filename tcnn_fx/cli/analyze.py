"""``tcnn-fx analyze HYBRID --data DIR``: content weights and attention distances of the converted layers."""

from __future__ import annotations

import json

import torch

from tcnn_fx.cli.arguments import add_model_arguments, positive_int
from tcnn_fx.cli.common import (
    check_output_file,
    console,
    evaluation_split,
    load_model,
    model_and_policy,
    outputs,
    require_matplotlib,
)

SEED = "the image sample (balanced over classes) and, for a spec MODEL, its random initial weights"


def add_parser(commands) -> None:
    sub = commands.add_parser("analyze", help="gates and attention distances of a hybrid's converted layers")
    add_model_arguments(sub, seed=SEED)
    sub.add_argument("--data", required=True, metavar="DIR",
                     help="dataset folder or .tar; images come from its val/ (or test/) split")  # fmt: skip
    sub.add_argument("--images", type=positive_int, default=256,
                     help="how many images, balanced over classes (default 256)")  # fmt: skip
    sub.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    sub.add_argument("--plot", metavar="FILE", help="also write a PNG plot (needs matplotlib)")
    sub.set_defaults(run=run)


def run(args) -> None:
    from tcnn_fx import analysis
    from tcnn_fx.training import balanced_subset

    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    require_matplotlib("--plot", args.plot)
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
