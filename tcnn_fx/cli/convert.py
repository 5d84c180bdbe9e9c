"""``tcnn-fx convert MODEL --policy P --out FILE``: rewrite, optionally verify and export to ONNX, save."""

from __future__ import annotations

import dataclasses

from tcnn_fx import checkpoint
from tcnn_fx.cli.arguments import (
    add_model_arguments,
    add_policy_argument,
    add_settings_arguments,
    add_submodule_argument,
    settings_from_args,
)
from tcnn_fx.cli.common import check_output_file, console, load_model, outputs, parse_policy
from tcnn_fx.errors import UsageError, VerificationError
from tcnn_fx.export.lowering import Lowering
from tcnn_fx.export.onnx import SUPPORTED_OPSETS
from tcnn_fx.meta import report_of
from tcnn_fx.rewrite import rewrite
from tcnn_fx.verify import verify

SEED = (
    "a spec model's random initial weights (those --weights does not load) and of the random example input the "
    "model is traced, verified and checked in ONNX Runtime on"
)


def add_parser(commands) -> None:
    sub = commands.add_parser("convert", help="convert, optionally verify, and save a hybrid")
    add_model_arguments(sub, seed=SEED, example_batch=True)
    add_submodule_argument(sub)
    add_policy_argument(sub, "stage4", "the sites to convert (default stage4)")
    sub.add_argument("--verify", action="store_true",
                     help="compare with the original; on a mismatch, write nothing and exit with status 1")  # fmt: skip
    sub.add_argument("--fold-norm", action="store_true", help="fold eval-mode batch norms into the layers")
    sub.add_argument("--out", required=True, metavar="FILE",
                     help="checkpoint to write, a safetensors file whatever its ending (load with tcnn_fx.load)")  # fmt: skip
    sub.add_argument("--onnx", metavar="FILE", help="also export to this ONNX file and check it with ONNX Runtime")
    sub.add_argument("--opset", type=int, default=18, choices=SUPPORTED_OPSETS, help="ONNX opset (default 18)")
    sub.add_argument("--fp16", action="store_true", help="export half precision (weights, activations, I/O)")
    sub.add_argument("--fixed-resolution", action="store_true",
                     help="fix the ONNX file's height and width to the example's (positional maps folded into "
                          "constants); by default the file runs at any size the model accepts")  # fmt: skip
    group = sub.add_argument_group("ONNX lowering (tcnn_fx.export.lowering.Lowering, one flag per field)")
    add_settings_arguments(group, Lowering)
    sub.add_argument("--verbose", action="store_true",
                     help="show ONNX Runtime's own log messages (warnings and above; by default only its errors)")  # fmt: skip
    sub.set_defaults(run=run)


def run(args) -> None:
    if args.module and args.onnx:
        raise UsageError(
            "--onnx exports whole classifiers; with --module, export the rewritten submodule from Python: "
            "tcnn_fx.export.to_onnx(hybrid.get_submodule(MODULE), FILE, inputs)"
        )
    onnx_flags = {"--fp16": args.fp16, "--fixed-resolution": args.fixed_resolution}
    onnx_flags |= {f"--{f.name}": getattr(args, f.name) != f.default for f in dataclasses.fields(Lowering)}
    if not args.onnx and any(onnx_flags.values()):
        given = [flag for flag, set_ in onnx_flags.items() if set_]
        raise UsageError(f"{', '.join(given)}: settings of the ONNX export; pass --onnx FILE too")
    lowering = settings_from_args(Lowering, args)
    lowering.check_opset(args.opset)
    check_output_file(args.out, "--out")
    check_output_file(args.onnx, "--onnx")
    policy = parse_policy(args.policy)
    model, inputs = load_model(args, example_batch=args.example_batch)
    within = f" in '{args.module}'" if args.module else ""
    with console.status(f"rewriting with policy {args.policy!r}{within}"):
        hybrid = rewrite(model, policy, inputs, module=args.module, fold_norm=args.fold_norm, spec=args.model)
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
            raise VerificationError(
                f"{args.model}: the hybrid does not match the original (--verify; table above); nothing written"
            )
    with outputs() as files:
        if args.onnx:
            from tcnn_fx.export import to_onnx, verify_onnx

            staged = files.stage(args.onnx)
            with console.status(f"exporting to ONNX (opset {args.opset})"):
                to_onnx(hybrid, staged, inputs, opset=args.opset, fp16=args.fp16, lowering=lowering,
                        dynamic_resolution=not args.fixed_resolution)  # fmt: skip
            with console.status("checking the ONNX file with ONNX Runtime"):
                checks = verify_onnx(hybrid, staged, inputs, log_level="warning" if args.verbose else "error")
            console.print("\n".join(check.table() for check in checks))
        checkpoint.save(hybrid, files.stage(args.out))
    console.print(f"saved to {args.out}" + (f", exported to {args.onnx}" if args.onnx else ""))
