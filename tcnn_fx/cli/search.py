"""``tcnn-fx search MODEL --out DIR``: which sites to convert, as the Pareto front of accuracy against cost."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.table import Table

from tcnn_fx.cli.arguments import (
    add_model_arguments,
    add_recipe_arguments,
    add_settings_arguments,
    comma_separated,
    positive_int,
    recipe_from_args,
    settings_from_args,
)
from tcnn_fx.cli.common import check_output_file, check_output_folder, console, load_model, training_splits
from tcnn_fx.cost import RATIOS
from tcnn_fx.errors import MissingDependencyError, MissingFileError, UsageError
from tcnn_fx.policy import Policy
from tcnn_fx.training.recipe import Recipe

OBJECTIVES = ("accuracy", "latency_ratio", "flop_ratio", "param_ratio")
#: A search fine-tunes many candidates: a short recipe by default.
RECIPE = Recipe(epochs=1, warmup_epochs=0.2, workers=0)
CONSTRAINTS_HELP = {
    "max_flop_ratio": f"prune candidates above this FLOP ratio ({RATIOS})",
    "max_param_ratio": f"prune candidates above this parameter ratio ({RATIOS})",
    "max_latency_ratio": "prune candidates whose measured hybrid / CNN latency is above this",
}
SEED = (
    "the sampler's choice of candidates, each candidate's fine-tune (data order, augmentation), and a spec "
    "model's random initial weights (those --weights does not load) and random example input"
)


HELP = "search which sites to convert: Pareto front of accuracy vs cost"


def _missing_optuna(error: ImportError) -> MissingDependencyError:
    return MissingDependencyError(f"tcnn-fx search needs Optuna ({error}): pip install 'tcnn_fx[search]'")


def add_parser(commands) -> None:
    try:
        from tcnn_fx.search.study import Constraints
    except ImportError as error:  # any arguments, then the one-line error that says what to install
        sub = commands.add_parser("search", help=f"{HELP} (needs Optuna)")
        sub.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        problem = _missing_optuna(error)

        def unavailable(args) -> None:
            raise problem

        sub.set_defaults(run=unavailable)
        return
    sub = commands.add_parser("search", help=HELP)
    add_model_arguments(sub, seed=SEED)
    sub.add_argument("--out", required=True, metavar="DIR",
                     help="folder for the study journal, front.csv/json/png, policies/")  # fmt: skip
    sub.add_argument("--data", metavar="DIR", help="dataset folder or .tar (needed for the accuracy objective)")
    sub.add_argument("--base-policy", default="all", help="only sites this policy expression selects are searched")
    sub.add_argument("--group", choices=("site", "block", "stage"), default="site", help="one choice per ...")
    sub.add_argument("--objectives", type=comma_separated(str, OBJECTIVES), default=("accuracy", "latency_ratio"),
                     metavar="NAME,NAME", help=f"comma-separated, from {', '.join(OBJECTIVES)} "
                     f"(default accuracy,latency_ratio); ratios are {RATIOS}")  # fmt: skip
    sub.add_argument(
        "--trials", type=positive_int, default=50, help="trials to run now; a rerun adds more (default 50)"
    )
    sub.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe")
    sub.add_argument("--population", type=positive_int, default=16, help="NSGA-II population size (default 16)")
    add_settings_arguments(sub.add_argument_group("constraints"), Constraints, help=CONSTRAINTS_HELP)
    sub.add_argument("--storage", help="journal file or Optuna RDB URL (default OUT/study.journal)")
    sub.add_argument("--study", help="study name (default: MODEL|BASE-POLICY|GROUP)")
    sub.add_argument("--export-policy", type=int, metavar="TRIAL", help="write the policy of this trial and stop")
    sub.add_argument("--policy-out", metavar="FILE", help="file for --export-policy (default OUT/trial_N.json)")
    sub.add_argument("--accuracy", choices=("finetune", "proxy"), default="finetune",
                     help="short fine-tune per candidate, or the cheap proxy (one epoch on --proxy-images per class)")  # fmt: skip
    sub.add_argument("--train-subset", type=positive_int, metavar="N", help="fine-tune on N images per class")
    sub.add_argument("--proxy-images", type=positive_int, default=20, metavar="N",
                     help="proxy: images per class for its one epoch (default 20)")  # fmt: skip
    sub.add_argument("--eval-subset", type=positive_int, metavar="N", help="evaluate on N images per class")
    sub.add_argument("--in-memory", action="store_true", help="decode all images once into memory")
    sub.add_argument("--runtime", choices=("torch", "ort"), default="torch", help="latency measured on this runtime")
    sub.add_argument("--latency-batch", type=positive_int, default=8, metavar="N",
                     help="batch size the latency is timed at (default 8)")  # fmt: skip
    sub.add_argument("--num-classes", type=positive_int, metavar="N", help="replace the classifier head")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    add_recipe_arguments(sub, RECIPE)
    sub.set_defaults(run=run)


def run(args) -> None:
    try:
        from tcnn_fx.search import Constraints, SearchSettings, SearchSpace, load_study, run_search
    except ImportError as error:
        raise _missing_optuna(error) from error
    from tcnn_fx.search import front as fronts
    from tcnn_fx.search.evaluate import CandidateEvaluator

    objectives = args.objectives
    accuracy = "accuracy" in objectives and args.export_policy is None
    if accuracy and not args.data:
        raise UsageError(
            "the accuracy objective fine-tunes each candidate: pass --data, or leave accuracy out of --objectives"
        )
    if accuracy and not Path(args.data).exists():
        raise MissingFileError(f"--data {args.data} does not exist")
    out = check_output_folder(args.out, "--out")
    check_output_file(args.policy_out, "--policy-out")
    Policy(args.base_policy)  # its syntax, before any work
    recipe = recipe_from_args(args, RECIPE)
    if args.accuracy == "proxy":
        recipe = dataclasses.replace(recipe, epochs=1)
    constraints = settings_from_args(Constraints, args)
    settings = SearchSettings(objectives=objectives, constraints=constraints, sampler=args.sampler,
                              trials=args.trials, seed=args.seed, population=args.population)  # fmt: skip
    model, inputs = load_model(args)
    space = SearchSpace.build(model, inputs, args.base_policy, args.group)
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or str(out / "study.journal")
    name = args.study or f"{args.model}|{args.base_policy}|{args.group}"
    study = load_study(space, settings, storage, name, spec=args.model)  # refuses another model's study up front
    if args.export_policy is not None:
        fronts.export_policy(study, args.export_policy, args.policy_out or out / f"trial_{args.export_policy}.json")
        console.print(f"wrote the policy of trial {args.export_policy}")
        return
    console.print(f"search space: {len(space.groups)} {args.group} choices ({space.size} candidates) under "
                  f"{args.base_policy!r}; study {name!r} in {storage} has {len(study.trials)} trials")  # fmt: skip
    train = evaluation = None
    if accuracy:
        per_class = args.proxy_images if args.accuracy == "proxy" else args.train_subset
        train, evaluation = training_splits(args, model, inputs, per_class, args.eval_subset)
    evaluator = CandidateEvaluator(model, inputs, space, train=train, evaluation=evaluation,
                                   recipe=recipe if accuracy else None, runtime=args.runtime,
                                   batch=args.latency_batch)  # fmt: skip
    study = run_search(space, evaluator, settings, storage, name, spec=args.model, progress=not args.quiet)
    table = Table(title=f"Pareto front of {name!r} ({fronts.summary(study)['trials']} trials)",
                  caption=f"ratios: {RATIOS}")  # fmt: skip
    values = (*objectives, *(() if "flop_ratio" in objectives else ("flop_ratio",)))
    for column in ("trial", *values, "converted", "groups"):
        table.add_column(column, justify="left" if column == "groups" else "right")
    for row in fronts.front(study):
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in values]
        table.add_row(str(row["trial"]), *cells, str(row["converted"]), row["groups"][:80])
    console.print(table)
    written = fronts.write(study, out)
    fronts.plot(study, out / "front.png")
    for number, reason in fronts.summary(study)["failed"].items():
        console.print(f"[yellow]trial {number} failed:[/] {reason}")
    console.print(f"front: {written['csv']}, {written['json']}, {out / 'front.png'}, policies in {written['policies']}")
