"""``tcnn-fx finetune MODEL --data DIR --out RUN``: optional ViT passes, the policy's rewrite, fine-tuning, the
fine-tuned model saved as ``RUN/model.safetensors``."""

from __future__ import annotations

import json
import os

from tcnn_fx import checkpoint
from tcnn_fx.cli.arguments import (
    add_model_arguments,
    add_policy_argument,
    add_recipe_arguments,
    add_settings_arguments,
    positive_int,
    recipe_from_args,
    settings_from_args,
)
from tcnn_fx.cli.common import (
    check_output_folder,
    console,
    is_checkpoint,
    load_model,
    outputs,
    parse_policy,
    training_splits,
)
from tcnn_fx.errors import InvalidInputError, UsageError
from tcnn_fx.meta import report_of
from tcnn_fx.passes.vit import ViTPasses, apply_vit_passes, measure_impulse_mass
from tcnn_fx.rewrite import rewrite

MODEL_FILE = "model.safetensors"
INIT_RECORD = "attention_init.json"
SEED = (
    "a spec model's random initial weights (those --weights does not load, e.g. a new --num-classes head, a "
    "--conv-stem), the random example input, the --attention-init draws (impulse offsets, mimetic noise), and the "
    "training's data order and augmentation"
)


def add_parser(commands) -> None:
    sub = commands.add_parser("finetune", help="fine-tune a hybrid (or, with --policy none, the CNN) on an ImageFolder")
    add_model_arguments(sub, seed=SEED, checkpoints=False)
    add_policy_argument(sub, "none", "the sites to convert before training (default none: train the CNN itself)")
    sub.add_argument("--data", required=True, metavar="DIR",
                     help="folder with train/ and val/ (or test/) ImageFolders, or a .tar of one")  # fmt: skip
    sub.add_argument("--out", required=True, metavar="RUN",
                     help=f"output folder: last.pt (each epoch), metrics.jsonl, {MODEL_FILE} (at the end)")  # fmt: skip
    sub.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    sub.add_argument("--num-classes", type=positive_int, metavar="N",
                     help="replace the classifier head with one of N classes")  # fmt: skip
    sub.add_argument("--train-subset", type=positive_int, metavar="N",
                     help="train on N images per class (a fixed balanced sample)")  # fmt: skip
    sub.add_argument("--in-memory", action="store_true", help="decode all images once into memory (small datasets)")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    vit = sub.add_argument_group("ViT passes, applied before the policy's rewrite (tcnn_fx.passes.vit.ViTPasses)")
    add_settings_arguments(vit, ViTPasses, skip=("seed",))
    add_recipe_arguments(sub)
    sub.set_defaults(run=run)


def run(args) -> None:
    from tcnn_fx.training import finetune
    from tcnn_fx.training.loop import check_batches, check_run_folder

    recipe = recipe_from_args(args)
    passes = settings_from_args(ViTPasses, args, seed=args.seed)
    if is_checkpoint(args.model):
        raise UsageError(f"finetune starts from a model spec (with --weights), not from the checkpoint {args.model}")
    check_run_folder(check_output_folder(args.out, "--out"), args.resume)
    policy = parse_policy(args.policy)
    model, inputs = load_model(args)
    train, evaluation = training_splits(args, model, inputs, args.train_subset, None)
    try:
        check_batches(len(train), recipe.batch_size, int(os.environ.get("WORLD_SIZE", "1")))
    except InvalidInputError as error:  # the same check as the loop's, said in the command's flags
        raise InvalidInputError(f"--data {args.data}: {error} (--batch-size {recipe.batch_size})") from None
    main_process = int(os.environ.get("RANK", "0")) == 0
    model, records = apply_vit_passes(model, inputs, passes, inplace=True)
    for line in records.lines(passes.position_scale):
        console.print(line, markup=False)
    mass = None
    if records.attention_init is not None and records.attention_init.method == "impulse" and main_process:
        mass = measure_impulse_mass(model, records.attention_init, evaluation)
        for line in mass.lines():
            console.print(line, markup=False)
    with console.status(f"rewriting with policy {args.policy!r}"):
        hybrid = rewrite(model, policy, inputs, spec=args.model)
    console.print(f"[bold]{args.model}[/]: {report_of(hybrid).summary()}")
    console.print(f"training on {len(train)} images, evaluating on {len(evaluation)}; recipe {recipe.to_dict()}")
    if mass is not None:  # written before training: it shows while the run goes on
        os.makedirs(args.out, exist_ok=True)
        with outputs() as files:
            files.write_text(os.path.join(args.out, INIT_RECORD), json.dumps(mass.to_dict(), indent=1) + "\n")
    identity = {"spec": args.model, "weights": args.weights, "policy": args.policy, "num_classes": args.num_classes,
                "attention_init": passes.attention_init, "position_scale": passes.position_scale,
                "conv_stem": records.stem_record}  # fmt: skip
    result = finetune(hybrid, train, evaluation, recipe, args.out, resume=args.resume, progress=not args.quiet,
                      identity=identity)  # fmt: skip
    if not main_process:  # under torchrun, rank 0 writes the model
        return
    out = os.path.join(args.out, MODEL_FILE)
    checkpoint.save(result.model.cpu(), out, num_classes=args.num_classes, conv_stem=records.stem_record)
    start, end = result.history[0]["val_top1"], result.final_top1
    console.print(f"top-1 {start:.4f} before, {end:.4f} after {recipe.epochs} epochs; model saved to {out}")
