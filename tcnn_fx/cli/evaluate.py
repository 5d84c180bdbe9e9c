"""``tcnn-fx evaluate MODEL --data DIR``: clean and corrupted top-1 (CIFAR-10-C / ImageNet-C protocol)."""

from __future__ import annotations

import argparse
import json

from tcnn_fx.cli.arguments import add_model_arguments, add_policy_argument, comma_separated, positive_int
from tcnn_fx.cli.common import (
    check_classes,
    check_output_file,
    console,
    evaluation_split,
    load_model,
    outputs,
    parse_policy,
)
from tcnn_fx.rewrite import rewrite
from tcnn_fx.robustness.corruptions import CORRUPTIONS, SEVERITIES

SEED = (
    "the corrupted images' noise (the same for every model evaluated with this seed), the --per-class sample, and "
    "a spec model's random initial weights (those --weights does not load) and random example input"
)


def corruption_list(text: str) -> tuple[str, ...]:
    return CORRUPTIONS if text == "all" else comma_separated(str, CORRUPTIONS)(text)


corruption_list.__name__ = "corruption list"


def add_parser(commands) -> None:
    sub = commands.add_parser("evaluate", help="clean and corrupted top-1 (CIFAR-10-C / ImageNet-C style)")
    add_model_arguments(sub, seed=SEED)
    sub.add_argument("--data", required=True, metavar="DIR",
                     help="dataset folder or .tar; its val/ (or test/) split is used")  # fmt: skip
    add_policy_argument(sub, "none", "convert these sites first (default none: evaluate MODEL as it is)")
    sub.add_argument("--num-classes", type=positive_int, metavar="N",
                     help="replace a spec model's classifier head with one of N classes")  # fmt: skip
    sub.add_argument("--corruptions", type=corruption_list, default=CORRUPTIONS, metavar="NAME,NAME",
                     help=f"comma-separated, from {', '.join(CORRUPTIONS)} (default all)")  # fmt: skip
    sub.add_argument("--severities", type=comma_separated(int, SEVERITIES), default=SEVERITIES, metavar="S,S",
                     help="comma-separated severities, 1 to 5 (default all)")  # fmt: skip
    sub.add_argument("--per-class", type=positive_int, metavar="N",
                     help="corrupted copies use N images per class (default all images)")  # fmt: skip
    sub.add_argument("--batch-size", type=positive_int, default=256, help="images per evaluation batch (default 256)")
    sub.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from tcnn_fx.robustness import evaluate_robustness

    check_output_file(args.json, "--json")
    policy = None if args.policy == "none" else parse_policy(args.policy)
    split, preprocessing = evaluation_split(args)
    model, inputs = load_model(args)
    if policy is not None:
        with console.status(f"rewriting with policy {args.policy!r}"):
            model = rewrite(model, policy, inputs, spec=args.model)
    check_classes(model, inputs, split.classes, args.data)
    report = evaluate_robustness(
        model, split, preprocessing, corruptions=args.corruptions, severities=args.severities,
        per_class=args.per_class, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    console.print(report.table(), markup=False)
    if args.json:
        with outputs() as files:
            record = {"model": args.model, "policy": args.policy} | report.to_dict()
            files.write_text(args.json, json.dumps(record, indent=2) + "\n")
