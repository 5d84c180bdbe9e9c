"""The ``tcnn-fx`` command line.

    tcnn-fx sites MODEL [--input-size 224] [--weights FILE] [--graphml FILE] [--json FILE]
    tcnn-fx convert MODEL --policy stage4 [--weights FILE] [--verify] [--fold-norm] --out FILE [--onnx FILE]
    tcnn-fx bench MODEL --policy stage4 [--batch 1,8] [--runtime torch,ort] [--json FILE] [--plot FILE]

MODEL is ``torchvision:NAME``, ``timm:NAME``, ``cifar:resnetDEPTH`` or
``path/to/file.py:factory``.  ``--policy`` takes an expression
(``stage4``, ``stage>=3 & res<=14`` ...) or a policy file (``.json``,
``.yaml``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import networkx as nx
import torch
from rich.console import Console
from rich.table import Table

from tcnn_fx import checkpoint, specs
from tcnn_fx.policy import Policy
from tcnn_fx.rewrite import SITES_KEY, report_of, rewrite, trace
from tcnn_fx.sites import site_graph
from tcnn_fx.verify import verify

console = Console(width=None if sys.stdout.isatty() else 200)


def _model_and_inputs(args) -> tuple[torch.nn.Module, tuple]:
    with console.status(f"building {args.model}"):
        model = specs.load_model(args.model, args.weights)
    size = args.input_size or specs.default_input_size(args.model)
    torch.manual_seed(args.seed)
    return model.eval(), (torch.randn(getattr(args, "batch_size", 1), 3, size, size),)


def _gflops(flops: int) -> str:
    return f"{flops / 1e9:.3f}"


def sites_command(args) -> None:
    model, inputs = _model_and_inputs(args)
    with console.status("tracing and propagating shapes"):
        graph_module = trace(model, inputs)
    sites = graph_module.meta[SITES_KEY]
    table = Table(title=f"{args.model} at {inputs[0].shape[-1]}px: {len(sites)} convolution sites")
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
    leaves = graph_module.meta["tcnn_fx.capture"].fallback_leaves
    for name, reason in leaves.items():
        console.print(f"[yellow]kept whole (untraceable):[/] {name}: {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps([s.to_dict() for s in sites], indent=2) + "\n")
    if args.graphml:
        nx.write_graphml(site_graph(graph_module, sites), args.graphml)


def _policy(text: str) -> Policy:
    path = Path(text)
    if path.suffix in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"policy file {path} does not exist")
        return Policy.load(path)
    return Policy(select=text)


def convert_command(args) -> None:
    model, inputs = _model_and_inputs(args)
    with console.status(f"rewriting with policy {args.policy!r}"):
        hybrid = rewrite(model, _policy(args.policy), inputs, fold_norm=args.fold_norm, spec=args.model)
    report = report_of(hybrid)
    console.print(f"[bold]{args.model}[/]: {report.summary()}")
    for name in report.converted:
        console.print(f"  [green]converted[/] {name}")
    for name, reason in report.skipped.items():
        console.print(f"  [dim]skipped {name}: {reason}[/]")
    if args.verify:
        with console.status("verifying against the original"):
            result = verify(model, hybrid, inputs)
        console.print(result.table())
        if not result.passed:
            raise SystemExit(1)
    checkpoint.save(hybrid, args.out)
    console.print(f"saved to {args.out}")
    if args.onnx:
        from tcnn_fx.export import to_onnx, verify_onnx

        with console.status(f"exporting to ONNX (opset {args.opset})"):
            to_onnx(hybrid, args.onnx, inputs, opset=args.opset, fp16=args.fp16)
        with console.status("checking the ONNX file with ONNX Runtime"):
            checks = verify_onnx(hybrid, args.onnx, inputs)
        console.print("\n".join(check.table() for check in checks))
        console.print(f"exported to {args.onnx}")


def bench_command(args) -> None:
    from tcnn_fx.export.bench import bench, plot

    model, inputs = _model_and_inputs(args)
    with console.status(f"rewriting with policy {args.policy!r}"):
        hybrid = rewrite(model, _policy(args.policy), inputs, spec=args.model)
    batches = tuple(int(b) for b in args.batch.split(","))
    runtimes = tuple(args.runtime.split(","))
    with console.status(f"timing CNN and hybrid at batches {batches} on {runtimes}"):
        rows = bench(model, hybrid, tuple(inputs[0].shape[1:]), batches=batches, runtimes=runtimes, rounds=args.rounds)
    table = Table(title=f"{args.model}, policy {args.policy!r}, {inputs[0].shape[-1]}px, {torch.get_num_threads()} threads")
    for column in ("batch", "runtime", "CNN ms", "hybrid ms", "hybrid / CNN", "FLOP ratio", "runtime / torch"):
        table.add_column(column, justify="right")
    torch_rows = {(r.batch, "cnn"): r.cnn for r in rows if r.runtime == "torch"} | {
        (r.batch, "hybrid"): r.hybrid for r in rows if r.runtime == "torch"
    }
    for r in rows:
        versus_torch = "-"
        if r.runtime != "torch" and (r.batch, "hybrid") in torch_rows:
            versus_torch = f"{r.hybrid / torch_rows[(r.batch, 'hybrid')]:.2f}"
        table.add_row(str(r.batch), r.runtime, f"{r.cnn * 1e3:.2f}", f"{r.hybrid * 1e3:.2f}", f"{r.ratio:.3f}",
                      f"{r.flop_ratio:.3f}", versus_torch)  # fmt: skip
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot, title=f"{args.model} ({args.policy})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcnn-fx", description="Recast a CNN's convolutions as self-attention.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, batch: bool = True) -> None:
        sub.add_argument("model", help="torchvision:NAME, timm:NAME, cifar:resnetDEPTH or path/to/file.py:factory")
        sub.add_argument("--weights", help="a local state-dict file to load into the model")
        sub.add_argument("--input-size", type=int, help="square input size in pixels (default 224, 32 for cifar)")
        if batch:
            sub.add_argument("--batch", dest="batch_size", type=int, default=1, help="batch size of the example input")
        sub.add_argument("--seed", type=int, default=0, help="seed of the random example input")

    sites = commands.add_parser("sites", help="print the convolution sites of a model")
    common(sites)
    sites.add_argument("--json", help="also write the site table as JSON")
    sites.add_argument("--graphml", help="also write the site dataflow graph as GraphML")
    sites.set_defaults(run=sites_command)

    convert = commands.add_parser("convert", help="convert, optionally verify, and save a hybrid")
    common(convert)
    convert.add_argument("--policy", default="stage4", help="policy expression or .json/.yaml policy file")
    convert.add_argument("--verify", action="store_true", help="compare with the original, fail on mismatch")
    convert.add_argument("--fold-norm", action="store_true", help="fold eval-mode batch norms into the layers")
    convert.add_argument("--out", required=True, help="checkpoint to write (load with tcnn_fx.load)")
    convert.add_argument("--onnx", help="also export to this ONNX file and check it with ONNX Runtime")
    convert.add_argument("--opset", type=int, default=18, help="ONNX opset (18 to 23)")
    convert.add_argument("--fp16", action="store_true", help="export half precision (weights, activations, I/O)")
    convert.set_defaults(run=convert_command)

    bench = commands.add_parser("bench", help="time the CNN and its hybrid side by side (PyTorch and ONNX Runtime)")
    common(bench, batch=False)
    bench.add_argument("--policy", default="stage4", help="policy expression or .json/.yaml policy file")
    bench.add_argument("--batch", default="1,8", help="comma-separated batch sizes to time")
    bench.add_argument("--runtime", default="torch,ort", help="comma-separated runtimes: torch, ort")
    bench.add_argument("--rounds", type=int, default=20, help="timed rounds per batch size (median reported)")
    bench.add_argument("--json", help="also write the rows as JSON")
    bench.add_argument("--plot", help="also write a PNG plot of the ratios (needs matplotlib)")
    bench.set_defaults(run=bench_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        console.print(f"[red]error:[/] {error}")
        sys.exit(2)


if __name__ == "__main__":
    main()
