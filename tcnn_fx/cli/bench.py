"""``tcnn-fx bench MODEL --policy P``: the CNN and its hybrid timed side by side (PyTorch, ONNX Runtime)."""

from __future__ import annotations

import json

import torch
from rich.table import Table

from tcnn_fx.cli.arguments import add_model_arguments, add_policy_argument, comma_separated, positive_int
from tcnn_fx.cli.common import (
    add_report_outputs,
    check_report_outputs,
    console,
    load_model,
    model_and_policy,
    outputs,
    parse_policy,
)
from tcnn_fx.cost import RATIOS
from tcnn_fx.export.bench import RUNTIMES
from tcnn_fx.rewrite import rewrite

#: Every head's content weight in the timed hybrid: open, as after fine-tuning (the gates start at 0).
CONTENT_WEIGHT = 0.1
SEED = "a spec model's random initial weights (those --weights does not load) and of the random example input"


def add_parser(commands) -> None:
    sub = commands.add_parser("bench", help="time the CNN and its hybrid side by side (PyTorch and ONNX Runtime)")
    add_model_arguments(sub, seed=SEED)
    add_policy_argument(sub, "stage4", "the sites to convert (default stage4)")
    sub.add_argument("--batch-sizes", "--batch", type=comma_separated(positive_int), default=(1, 8), metavar="N,N",
                     help="comma-separated batch sizes to time (default 1,8)")  # fmt: skip
    sub.add_argument("--runtime", type=comma_separated(str, RUNTIMES), default=RUNTIMES, metavar="NAME,NAME",
                     help=f"comma-separated runtimes, from {', '.join(RUNTIMES)} (default all)")  # fmt: skip
    sub.add_argument("--content-weight", type=float, default=CONTENT_WEIGHT, metavar="W",
                     help="time the hybrid with every head's content weight at W, as after fine-tuning (default "
                          f"{CONTENT_WEIGHT}); 0 times it as converted, where its ONNX file is the CNN's graph")  # fmt: skip
    sub.add_argument("--rounds", type=positive_int, default=20,
                     help="timed rounds per batch size, the median reported (default 20)")  # fmt: skip
    add_report_outputs(sub, "also write the rows as JSON", "also write a PNG plot of the ratios (needs matplotlib)")
    sub.set_defaults(run=run)


def run(args) -> None:
    from tcnn_fx.export.bench import bench, plot

    check_report_outputs(args)
    policy = parse_policy(args.policy)
    model, inputs = load_model(args)
    with console.status(f"rewriting with policy {args.policy!r}"):
        hybrid = rewrite(model, policy, inputs, spec=args.model)
    batches, runtimes = args.batch_sizes, args.runtime
    with console.status(f"timing CNN and hybrid at batch sizes {batches} on {runtimes}"):
        rows = bench(model, hybrid, tuple(inputs[0].shape[1:]), batches=batches, runtimes=runtimes, rounds=args.rounds,
                     content_weight=args.content_weight)  # fmt: skip
    table = Table(
        title=f"{args.model}, policy {args.policy!r}, {inputs[0].shape[-1]}px, {torch.get_num_threads()} threads, "
        f"content weight {args.content_weight:g}",
        caption=f"FLOP ratio: {RATIOS}",
    )
    for column in ("batch", "runtime", "CNN ms", "hybrid ms", "hybrid / CNN", "FLOP ratio", "runtime / torch"):
        table.add_column(column, justify="right")
    torch_rows = {(r.batch, "hybrid"): r.hybrid for r in rows if r.runtime == "torch"}
    for r in rows:
        versus_torch = "-"
        if r.runtime != "torch" and (r.batch, "hybrid") in torch_rows:
            versus_torch = f"{r.hybrid / torch_rows[(r.batch, 'hybrid')]:.2f}"
        table.add_row(str(r.batch), r.runtime, f"{r.cnn * 1e3:.2f}", f"{r.hybrid * 1e3:.2f}", f"{r.ratio:.3f}",
                      f"{r.flop_ratio:.3f}", versus_torch)  # fmt: skip
    console.print(table)
    with outputs() as files:
        if args.json:
            files.write_text(args.json, json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
        if args.plot:
            plot(rows, files.stage(args.plot), title=f"{model_and_policy(args.model)[0]}, policy {args.policy}")
