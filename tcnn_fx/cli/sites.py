"""``tcnn-fx sites MODEL``: the stage table and the convolution sites of a model."""

from __future__ import annotations

import json

import networkx as nx
from rich.table import Table

from tcnn_fx import meta
from tcnn_fx.cli.arguments import add_model_arguments, add_submodule_argument
from tcnn_fx.cli.common import check_output_file, console, load_model, outputs
from tcnn_fx.rewrite import trace
from tcnn_fx.sites import site_graph
from tcnn_fx.stages import module_span, stage_table
from tcnn_fx.submodule import recorded_inputs, resolve

SEED = "a spec model's random initial weights and of the random example input (neither changes the tables)"


def add_parser(commands) -> None:
    sub = commands.add_parser("sites", help="print the stages and convolution sites of a model")
    add_model_arguments(sub, seed=SEED, example_batch=True)
    add_submodule_argument(sub)
    sub.add_argument("--json", metavar="FILE", help="also write the site table as JSON")
    sub.add_argument("--graphml", metavar="FILE", help="also write the site dataflow graph as GraphML")
    sub.set_defaults(run=run)


def _gflops(flops: int) -> str:
    return f"{flops / 1e9:.3f}"


def run(args) -> None:
    check_output_file(args.json, "--json")
    check_output_file(args.graphml, "--graphml")
    model, inputs = load_model(args, example_batch=args.example_batch)
    if args.module:
        with console.status(f"running {args.model} to record the inputs of '{args.module}'"):
            inputs = recorded_inputs(model, args.module, inputs)
        model = resolve(model, args.module)
    with console.status("tracing and propagating shapes"):
        graph_module = trace(model, inputs)
    sites = meta.sites(graph_module)
    where = f"{args.model} '{args.module}'" if args.module else args.model
    size = "x".join(map(str, inputs[0].shape[-2:]))
    stages = Table(title=f"{where} at {size}: stages")
    for column in ("stage", "resolution", "modules", "sites"):
        stages.add_column(column, justify="left" if column == "modules" else "right")
    for stage in stage_table(sites):
        stages.add_row(
            f"{stage.index}{' (stem)' if stage.index == 0 and any(s.stem for s in sites) else ''}",
            "x".join(map(str, stage.resolution)), module_span(stage.modules), str(stage.sites),
        )  # fmt: skip
    console.print(stages)
    table = Table(title=f"{where} at {size}: {len(sites)} convolution sites")
    for column in ("site", "stage", "block", "in -> out", "kernel", "stride", "groups", "channels",
                   "conv GFLOPs", "attn GFLOPs", "convertible"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("site", "convertible") else "right")
    for s in sites:
        status = "stem" if s.stem and s.convertible else ("yes" if s.convertible else f"no: {s.reason}")
        table.add_row(
            s.name, str(s.stage), str(s.block), f"{s.input_size[0]}x{s.input_size[1]} -> {s.output_size[0]}x{s.output_size[1]}",
            "x".join(map(str, s.kernel_size)), "x".join(map(str, s.geometry.stride)), str(s.geometry.groups),
            f"{s.in_channels}->{s.out_channels}", _gflops(s.conv_flops), _gflops(s.attention_flops), status,
        )  # fmt: skip
    console.print(table)
    for name, reason in meta.capture_info(graph_module).fallback_leaves.items():
        console.print(f"[yellow]kept whole (untraceable):[/] {name}: {reason}")
    with outputs() as files:
        if args.json:
            files.write_text(args.json, json.dumps([s.to_dict() for s in sites], indent=2) + "\n")
        if args.graphml:
            nx.write_graphml(site_graph(graph_module, sites), files.stage(args.graphml))
