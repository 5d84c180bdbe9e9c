"""The ``tcnn-fx`` command line.

    tcnn-fx sites MODEL [--module PATH] [--input-size 224] [--weights FILE] [--graphml FILE] [--json FILE]
    tcnn-fx convert MODEL [--module PATH] --policy stage4 [--weights FILE] [--verify] [--fold-norm] --out FILE [--onnx FILE]
    tcnn-fx bench MODEL --policy stage4 [--batch 1,8] [--runtime torch,ort] [--json FILE] [--plot FILE]
    tcnn-fx finetune MODEL [--weights FILE] --policy last --data DIR --out RUN [--resume] [--epochs N ...]
    tcnn-fx evaluate MODEL --data DIR [--corruptions all] [--severities 1,2,3,4,5] [--per-class N] [--json FILE]
    tcnn-fx analyze HYBRID.pt --data DIR [--images 256] [--json FILE] [--plot FILE]

MODEL is ``torchvision:NAME``, ``timm:NAME``, ``cifar:resnetDEPTH``,
``path/to/file.py:factory``, or a ``.pt`` file written by ``convert`` or
``finetune``.  ``--policy`` takes an expression
(``stage4``, ``stage>=3 & res<=14`` ...) or a policy file (``.json``,
``.yaml``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
from pathlib import Path

import networkx as nx
import torch
from rich.console import Console
from rich.table import Table

from tcnn_fx import checkpoint, meta, specs
from tcnn_fx.errors import InvalidInputError, MissingDependencyError, MissingFileError, TcnnFxError
from tcnn_fx.policy import Policy
from tcnn_fx.meta import report_of
from tcnn_fx.rewrite import rewrite, trace
from tcnn_fx.robustness.corruptions import CORRUPTIONS
from tcnn_fx.sites import site_graph
from tcnn_fx.stages import module_span, stage_table
from tcnn_fx.submodule import recorded_inputs, resolve
from tcnn_fx.training.recipe import OPTIMIZERS, Recipe
from tcnn_fx.verify import verify

console = Console(width=None if sys.stdout.isatty() else 200)


def _input_size(args) -> int:
    if _is_checkpoint(args.model):
        return args.input_size or checkpoint.read_recipe(args.model).input_shape[-1]
    return args.input_size or specs.default_input_size(args.model)


def _is_checkpoint(model: str) -> bool:
    return model.endswith((".pt", ".safetensors")) and Path(model).is_file()


def _model_and_inputs(args) -> tuple[torch.nn.Module, tuple]:
    """The model MODEL names (a spec, or a checkpoint of ``convert``/``finetune``) and a random example input."""
    torch.manual_seed(args.seed)  # random initial weights and example input follow --seed
    with console.status(f"building {args.model}"):
        if _is_checkpoint(args.model):
            model = checkpoint.load(args.model)
        else:
            model = specs.load_model(args.model, args.weights, num_classes=getattr(args, "num_classes", None))
    size = _input_size(args)
    return model.eval(), (torch.randn(getattr(args, "example_batch", 1), 3, size, size),)


def _gflops(flops: int) -> str:
    return f"{flops / 1e9:.3f}"


def sites_command(args) -> None:
    model, inputs = _model_and_inputs(args)
    if args.module:
        with console.status(f"running {args.model} to record the inputs of '{args.module}'"):
            inputs = recorded_inputs(model, args.module, inputs)
        model = resolve(model, args.module)
    with console.status("tracing and propagating shapes"):
        graph_module = trace(model, inputs)
    sites = graph_module.meta[meta.SITES]
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
    leaves = graph_module.meta[meta.CAPTURE].fallback_leaves
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
            raise MissingFileError(f"policy file {path} does not exist")
        return Policy.load(path)
    return Policy(select=text)


def convert_command(args) -> None:
    if args.module and args.onnx:
        raise InvalidInputError(
            "--onnx exports whole classifiers; with --module, export the rewritten submodule from Python: "
            "tcnn_fx.export.to_onnx(hybrid.get_submodule(MODULE), FILE, inputs)"
        )
    model, inputs = _model_and_inputs(args)
    with console.status(f"rewriting with policy {args.policy!r}" + (f" in '{args.module}'" if args.module else "")):
        hybrid = rewrite(
            model, _policy(args.policy), inputs, module=args.module, fold_norm=args.fold_norm, spec=args.model
        )
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
    table = Table(
        title=f"{args.model}, policy {args.policy!r}, {inputs[0].shape[-1]}px, {torch.get_num_threads()} threads"
    )
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


def _check_classes(model: torch.nn.Module, inputs: tuple, classes: list[str], data: str) -> None:
    with torch.no_grad():
        outputs = model(*inputs).shape[-1]
    if outputs != len(classes):
        raise InvalidInputError(
            f"the model has {outputs} outputs but {data} has {len(classes)} classes; "
            f"pass --num-classes {len(classes)} to replace the classifier head"
        )


def _recipe(args) -> Recipe:
    return Recipe(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        attention_lr=args.attention_lr, momentum=args.momentum, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, clip_grad_norm=args.clip_grad,
        amp=not args.no_amp, seed=args.seed, workers=args.workers,
    )  # fmt: skip


def _report_skipped(split) -> None:
    if split.skipped:
        console.print(f"[yellow]skipped {len(split.skipped)} undecodable images in {split.root}[/]")


def _training_splits(
    args, model: torch.nn.Module, inputs: tuple, train_per_class: int | None, eval_per_class: int | None
):
    """Train and evaluation splits of ``--data`` for ``model`` (classes checked), optionally class-balanced samples."""
    from tcnn_fx.training import Preprocessing, balanced_subset, load_splits

    with console.status(f"reading {args.data}"):
        train, evaluation = load_splits(args.data, Preprocessing(_input_size(args)), in_memory=args.in_memory)
    for split in (train, evaluation):
        _report_skipped(split)
    _check_classes(model, inputs, train.classes, args.data)
    if train_per_class:
        train = torch.utils.data.Subset(train, balanced_subset(train.targets, train_per_class, seed=0))
    if eval_per_class:
        evaluation = torch.utils.data.Subset(evaluation, balanced_subset(evaluation.targets, eval_per_class, seed=0))
    return train, evaluation


def _vit_passes(args, model: torch.nn.Module, inputs: tuple):
    """Apply ``--conv-stem``, ``--position-scale`` and ``--attention-init``.

    Returns the model, the conv stem record for the checkpoint and the attention init report (or ``None``s).
    """
    if args.remove_block and not args.conv_stem:
        raise InvalidInputError("--remove-block goes with --conv-stem (it keeps the stem's FLOPs matched)")
    impulse_options = {"--impulse-kernel": args.impulse_kernel, "--impulse-target": args.impulse_target,
                       "--impulse-order": args.impulse_order}  # fmt: skip
    stray = [flag for flag, value in impulse_options.items() if value is not None]
    if stray and args.attention_init != "impulse":
        raise InvalidInputError(f"{', '.join(stray)} need --attention-init impulse (it is {args.attention_init})")
    stem = report = None
    if args.conv_stem:
        from tcnn_fx.passes.conv_stem import conv_stem

        model, stem_report = conv_stem(model, inputs, remove_block=args.remove_block, inplace=True)
        console.print(stem_report.table(), markup=False)
        stem = {"widths": list(stem_report.widths), "remove_block": args.remove_block}
    if args.position_scale is not None:
        from tcnn_fx.passes.attention_init import scale_positions

        model, factor = scale_positions(model, inputs, args.position_scale, inplace=True)
        console.print(f"positional embedding scaled by {factor:.3g} to {args.position_scale} x the patch tokens' RMS")
    if args.attention_init != "default":
        from tcnn_fx.passes.attention_init import impulse_init, mimetic_init

        if args.attention_init == "impulse":
            model, report = impulse_init(model, inputs, kernel_size=args.impulse_kernel or 3,
                                         target=args.impulse_target or "onehot", order=args.impulse_order or "random",
                                         seed=args.seed, inplace=True)  # fmt: skip
        else:
            model, report = mimetic_init(model, seed=args.seed, inplace=True)
        console.print(report.table(), markup=False)
    return model, stem, report


def _impulse_mass_in_model(model: torch.nn.Module, report, evaluation, out: Path) -> None:
    """Print and save (``OUT/attention_init.json``) how much the impulse heads attend to their targets on real images."""
    from tcnn_fx.passes.attention_init import measure_target_mass
    from tcnn_fx.training import balanced_subset

    smallest = min(collections.Counter(evaluation.targets).values())
    chosen = balanced_subset(evaluation.targets, min(smallest, max(1, 256 // len(evaluation.classes))), seed=0)
    images = torch.stack([evaluation[i][0] for i in chosen])
    masses = measure_target_mass(model, report, images)
    for layer in report.layers:
        positions = sum(layer.position_mass) / len(layer.position_mass)
        in_model = sum(masses[layer.name]) / len(masses[layer.name])
        console.print(f"  {layer.name}: target mass {positions:.3f} on positions alone, {in_model:.3f} in the model "
                      f"on {len(images)} images")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    record = {"report": dataclasses.asdict(report), "in_model_mass": masses, "images": len(images)}
    (out / "attention_init.json").write_text(json.dumps(record, indent=1) + "\n")


def finetune_command(args) -> None:
    from tcnn_fx.training import finetune

    recipe = _recipe(args)
    if _is_checkpoint(args.model):
        raise InvalidInputError(
            f"finetune starts from a model spec (with --weights), not from the checkpoint {args.model}"
        )
    model, inputs = _model_and_inputs(args)
    model, stem, init_report = _vit_passes(args, model, inputs)
    train, evaluation = _training_splits(args, model, inputs, args.train_subset, None)
    if init_report is not None and init_report.method == "impulse" and int(os.environ.get("RANK", "0")) == 0:
        _impulse_mass_in_model(model, init_report, evaluation, Path(args.out))
    with console.status(f"rewriting with policy {args.policy!r}"):
        hybrid = rewrite(model, _policy(args.policy), inputs, spec=args.model)
    console.print(f"[bold]{args.model}[/]: {report_of(hybrid).summary()}")
    console.print(f"training on {len(train)} images, evaluating on {len(evaluation)}; recipe {recipe.to_dict()}")
    identity = {"spec": args.model, "weights": args.weights, "policy": args.policy, "num_classes": args.num_classes,
                "attention_init": args.attention_init, "position_scale": args.position_scale,
                "conv_stem": stem}  # fmt: skip
    result = finetune(hybrid, train, evaluation, recipe, args.out, resume=args.resume, progress=not args.quiet,
                      identity=identity)  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 writes the model
        return
    out = Path(args.out) / "model.pt"
    checkpoint.save(result.model.cpu(), out, num_classes=args.num_classes, conv_stem=stem)
    start, end = result.history[0]["val_top1"], result.final_top1
    console.print(f"top-1 {start:.4f} before, {end:.4f} after {recipe.epochs} epochs; model saved to {out}")


def _evaluation_split(args):
    from tcnn_fx.training import ImageFolderData, Preprocessing, find_splits

    preprocessing = Preprocessing(_input_size(args))
    with console.status(f"reading {args.data}"):
        split = ImageFolderData(find_splits(args.data)[1], preprocessing.eval(), in_memory=True)
    _report_skipped(split)
    return split, preprocessing


def evaluate_command(args) -> None:
    from tcnn_fx.robustness import evaluate_robustness

    split, preprocessing = _evaluation_split(args)
    model, inputs = _model_and_inputs(args)
    if args.policy != "none":
        model = rewrite(model, _policy(args.policy), inputs, spec=args.model)
    _check_classes(model, inputs, split.classes, args.data)
    corruptions = CORRUPTIONS if args.corruptions == "all" else tuple(args.corruptions.split(","))
    severities = tuple(int(s) for s in args.severities.split(","))
    report = evaluate_robustness(model, split, preprocessing, corruptions=corruptions, severities=severities,
                                 per_class=args.per_class, seed=args.seed, progress=not args.quiet)  # fmt: skip
    console.print(report.table(), markup=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"model": args.model, "policy": args.policy} | report.to_dict(), indent=2) + "\n"
        )


def analyze_command(args) -> None:
    from tcnn_fx import analysis
    from tcnn_fx.training import balanced_subset

    split, _ = _evaluation_split(args)
    model, _ = _model_and_inputs(args)
    per_class = max(1, args.images // len(split.classes))
    images = torch.stack([split[i][0] for i in balanced_subset(split.targets, per_class, seed=args.seed)])
    with console.status(f"measuring attention on {len(images)} images"):
        rows = analysis.analyze_attention(model, images)
    console.print(analysis.table(rows), markup=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "images": len(images),
                                               "layers": [r.to_dict() for r in rows]}, indent=2) + "\n")  # fmt: skip
    if args.plot:
        analysis.plot(rows, args.plot, title=f"{args.model} on {len(images)} images")


def search_command(args) -> None:
    try:
        from tcnn_fx.search import Constraints, SearchSettings, SearchSpace, load_study, run_search
    except ImportError as error:
        raise MissingDependencyError(f"tcnn-fx search needs Optuna ({error}): pip install 'tcnn_fx[search]'") from error
    from tcnn_fx.search import front as fronts
    from tcnn_fx.search.evaluate import CandidateEvaluator

    objectives = tuple(args.objectives.split(","))
    if "accuracy" in objectives and not args.data and args.export_policy is None:
        raise InvalidInputError(
            "the accuracy objective fine-tunes each candidate: pass --data, or leave accuracy out of --objectives"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or str(out / "study.journal")
    model, inputs = _model_and_inputs(args)
    space = SearchSpace.build(model, inputs, args.base_policy, args.group)
    constraints = Constraints(args.max_flop_ratio, args.max_param_ratio, args.max_latency_ratio)
    settings = SearchSettings(objectives, constraints, args.sampler, args.trials, args.seed, args.population)
    name = args.study or f"{args.model}|{args.base_policy}|{args.group}"
    study = load_study(space, settings, storage, name, spec=args.model)  # refuses another model's study up front
    if args.export_policy is not None:
        fronts.export_policy(study, args.export_policy, args.policy_out or out / f"trial_{args.export_policy}.json")
        console.print(f"wrote the policy of trial {args.export_policy}")
        return
    console.print(f"search space: {len(space.groups)} {args.group} choices ({space.size} candidates) under {args.base_policy!r}; "
                  f"study {name!r} in {storage} has {len(study.trials)} trials")  # fmt: skip
    evaluator = CandidateEvaluator(model, inputs, space, runtime=args.runtime, batch=args.latency_batch)
    if "accuracy" in objectives:
        per_class = args.proxy_images if args.accuracy == "proxy" else args.train_subset
        train, evaluation = _training_splits(args, model, inputs, per_class, args.eval_subset)
        evaluator.train, evaluator.evaluation = train, evaluation
        evaluator.recipe = dataclasses.replace(_recipe(args), epochs=1 if args.accuracy == "proxy" else args.epochs)
    study = run_search(space, evaluator, settings, storage, name, spec=args.model, progress=not args.quiet)
    table = Table(title=f"Pareto front of {name!r} ({fronts.summary(study)['trials']} trials)")
    values = (*objectives, *(() if "flop_ratio" in objectives else ("flop_ratio",)))
    for column in ("trial", *values, "converted", "groups"):
        table.add_column(column, justify="left" if column == "groups" else "right")
    for row in fronts.front(study):
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in values]
        table.add_row(str(row["trial"]), *cells, str(row["converted"]), row["groups"][:80])
    console.print(table)
    written = fronts.write(study, out)
    fronts.plot(study, out / "front.png")
    failed = fronts.summary(study)["failed"]
    for number, reason in failed.items():
        console.print(f"[yellow]trial {number} failed:[/] {reason}")
    console.print(f"front: {written['csv']}, {written['json']}, {out / 'front.png'}, policies in {written['policies']}")


def _recipe_arguments(sub: argparse.ArgumentParser, defaults: Recipe) -> None:
    """One flag per Recipe field (read back by ``_recipe``)."""
    sub.add_argument("--epochs", type=int, default=defaults.epochs)
    sub.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    sub.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    sub.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate after warm-up")
    sub.add_argument(
        "--attention-lr", type=float, help="peak learning rate of the new attention parameters (default --lr)"
    )
    sub.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD (Nesterov) momentum")
    sub.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="not applied to norms, biases, gates"
    )
    sub.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    sub.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    sub.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    sub.add_argument(
        "--no-amp", action="store_true", help="no mixed precision on CUDA (the CPU always trains in float32)"
    )
    sub.add_argument("--workers", type=int, default=defaults.workers, help="data-loading processes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcnn-fx", description="Recast a CNN's convolutions as self-attention.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, batch: bool = True) -> None:
        sub.add_argument("model", help="torchvision:NAME, timm:NAME, cifar:resnetDEPTH or path/to/file.py:factory")
        sub.add_argument("--weights", help="a local state-dict file to load into the model")
        sub.add_argument("--input-size", type=int, help="square input size in pixels (default 224, 32 for cifar)")
        if batch:
            sub.add_argument(
                "--batch", dest="example_batch", type=int, default=1, help="batch size of the example input"
            )
        sub.add_argument("--seed", type=int, default=0, help="seed of the random example input")

    def submodule(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--module", help="only this submodule (a dotted path such as backbone.body: a detector's backbone); "
            "its input is recorded by running the model on the example input"
        )  # fmt: skip

    sites = commands.add_parser("sites", help="print the stages and convolution sites of a model")
    common(sites)
    submodule(sites)
    sites.add_argument("--json", help="also write the site table as JSON")
    sites.add_argument("--graphml", help="also write the site dataflow graph as GraphML")
    sites.set_defaults(run=sites_command)

    convert = commands.add_parser("convert", help="convert, optionally verify, and save a hybrid")
    common(convert)
    submodule(convert)
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

    tune = commands.add_parser(
        "finetune", help="fine-tune a hybrid (or, with --policy none, the CNN) on an ImageFolder"
    )
    common(tune, batch=False)
    tune.add_argument("--policy", default="none", help="policy of the sites to convert first ('none': the CNN itself)")
    tune.add_argument(
        "--data", required=True, help="folder with train/ and val/ (or test/) ImageFolders, or a .tar of one"
    )
    tune.add_argument("--out", required=True, help="output folder: last.pt (each epoch), metrics.jsonl, model.pt")
    tune.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tune.add_argument("--num-classes", type=int, help="replace the classifier head with one of this many classes")
    tune.add_argument("--train-subset", type=int, help="train on this many images per class (a fixed balanced sample)")
    tune.add_argument("--in-memory", action="store_true", help="decode all images once into memory (small datasets)")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    vit = tune.add_argument_group("ViT passes (applied before the policy's rewrite; see docs/vit.md)")
    vit.add_argument("--conv-stem", action="store_true", help="replace the patchify stem with a convolutional stem")
    vit.add_argument("--remove-block", action="store_true", help="with --conv-stem: drop the last transformer block")
    vit.add_argument("--attention-init", choices=("default", "impulse", "mimetic"), default="default",
                     help="initialise the attention layers' queries/keys (and values for mimetic)")  # fmt: skip
    vit.add_argument("--impulse-kernel", type=int, help="impulse window K, offsets within K x K (default 3)")
    vit.add_argument("--impulse-target", choices=("onehot", "distance"), help="impulse logit target (default onehot)")
    vit.add_argument("--impulse-order", choices=("random", "fixed"),
                     help="impulse offsets drawn at random per head (default) or walking the window row-major")  # fmt: skip
    vit.add_argument("--position-scale", type=float,
                     help="rescale the positional embedding to this multiple of the patch tokens' RMS")  # fmt: skip
    _recipe_arguments(tune, Recipe())
    tune.set_defaults(run=finetune_command)

    evaluate = commands.add_parser("evaluate", help="clean and corrupted top-1 (CIFAR-10-C / ImageNet-C style)")
    common(evaluate, batch=False)
    evaluate.add_argument("--data", required=True, help="dataset folder or .tar; its val/ (or test/) split is used")
    evaluate.add_argument("--policy", default="none", help="convert these sites first (default: evaluate MODEL as is)")
    evaluate.add_argument(
        "--num-classes", type=int, help="replace the classifier head (a spec's weights for another class count)"
    )
    evaluate.add_argument("--corruptions", default="all", help=f"comma-separated, from {', '.join(CORRUPTIONS)}")
    evaluate.add_argument("--severities", default="1,2,3,4,5", help="comma-separated severities, 1 to 5")
    evaluate.add_argument("--per-class", type=int, help="corrupted copies use this many images per class (default all)")
    evaluate.add_argument("--json", help="also write the result as JSON")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(run=evaluate_command)

    analyze = commands.add_parser("analyze", help="gates and attention distances of a hybrid's converted layers")
    common(analyze, batch=False)
    analyze.add_argument(
        "--data", required=True, help="dataset folder or .tar; images come from its val/ (or test/) split"
    )
    analyze.add_argument("--images", type=int, default=256, help="how many images (balanced over classes)")
    analyze.add_argument("--json", help="also write the table as JSON")
    analyze.add_argument("--plot", help="also write a PNG plot (needs matplotlib)")
    analyze.set_defaults(run=analyze_command)

    search = commands.add_parser("search", help="search which sites to convert: Pareto front of accuracy vs cost")
    common(search, batch=False)
    search.add_argument("--out", required=True, help="folder for the study journal, front.csv/json/png, policies/")
    search.add_argument("--data", help="dataset folder or .tar (needed for the accuracy objective)")
    search.add_argument("--base-policy", default="all", help="only sites this policy selects are searched")
    search.add_argument("--group", choices=("site", "block", "stage"), default="site", help="one choice per ...")
    search.add_argument("--objectives", default="accuracy,latency_ratio",
                        help="comma-separated: accuracy, latency_ratio, flop_ratio, param_ratio")  # fmt: skip
    search.add_argument("--trials", type=int, default=50, help="trials to run now (a rerun adds more)")
    search.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe")
    search.add_argument("--population", type=int, default=16, help="NSGA-II population size")
    search.add_argument("--max-flop-ratio", type=float)
    search.add_argument("--max-param-ratio", type=float)
    search.add_argument("--max-latency-ratio", type=float)
    search.add_argument("--storage", help="journal file or Optuna RDB URL (default OUT/study.journal)")
    search.add_argument("--study", help="study name (default: MODEL|BASE-POLICY|GROUP)")
    search.add_argument("--export-policy", type=int, metavar="TRIAL", help="write the policy of this trial and stop")
    search.add_argument("--policy-out", help="file for --export-policy (default OUT/trial_N.json)")
    search.add_argument("--accuracy", choices=("finetune", "proxy"), default="finetune",
                        help="short fine-tune per candidate, or the cheap proxy (one epoch on --proxy-images per class)")  # fmt: skip
    search.add_argument("--train-subset", type=int, help="fine-tune on this many images per class")
    search.add_argument("--proxy-images", type=int, default=20, help="proxy: images per class for its one epoch")
    search.add_argument("--eval-subset", type=int, help="evaluate on this many images per class")
    search.add_argument("--in-memory", action="store_true", help="decode all images once into memory")
    search.add_argument("--runtime", choices=("torch", "ort"), default="torch", help="latency measured on this runtime")
    search.add_argument("--latency-batch", type=int, default=8)
    search.add_argument("--num-classes", type=int, help="replace the classifier head")
    search.add_argument("--quiet", action="store_true")
    _recipe_arguments(search, Recipe(epochs=1, warmup_epochs=0.2, workers=0))
    search.set_defaults(run=search_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except TcnnFxError as error:
        console.print(f"[red]error:[/] {error}")
        sys.exit(2)


if __name__ == "__main__":
    main()
