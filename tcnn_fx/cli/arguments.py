"""Argument helpers: the MODEL arguments every command takes, value types, and flags generated from a settings
dataclass (one flag per field, read back into the dataclass by ``settings_from_args``)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable

from tcnn_fx.errors import UsageError

TRUST_MODEL_FILE_HELP = (
    "let a checkpoint MODEL whose base model is a Python file (a path/to/file.py:factory spec) run that file: "
    "loading executes the file's code (after checking that its SHA-256 is the one the checkpoint recorded). "
    "Only for checkpoints and files you trust"
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def comma_separated(item: Callable[[str], object], choices: Iterable | None = None) -> Callable[[str], tuple]:
    """An argparse type: a comma-separated list of ``item`` values, each among ``choices`` if given."""
    allowed = tuple(choices) if choices is not None else None

    def parse(text: str) -> tuple:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"{text!r} has an empty item; give comma-separated values such as 1,8")
        values = []
        for part in parts:
            try:
                value = item(part)
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise argparse.ArgumentTypeError(f"{part!r} in {text!r}: {error}") from None
            if allowed is not None and value not in allowed:
                raise argparse.ArgumentTypeError(f"{part!r} is not one of {', '.join(map(str, allowed))}")
            values.append(value)
        return tuple(values)

    parse.__name__ = "comma-separated list"  # argparse's "invalid <name> value" message
    return parse


def add_model_arguments(
    sub: argparse.ArgumentParser, *, seed: str, checkpoints: bool = True, example_batch: bool = False
) -> None:
    """MODEL, ``--weights``, ``--input-size``, ``--seed`` (its help says what it seeds in this command), and
    ``--trust-model-file`` where MODEL may be a checkpoint, ``--example-batch`` where asked."""
    model = "torchvision:NAME, timm:NAME, cifar:resnetDEPTH or path/to/file.py:factory"
    if checkpoints:
        model += ", or a checkpoint (.safetensors, .pt) written by convert or finetune"
    sub.add_argument("model", metavar="MODEL", help=model)
    sub.add_argument("--weights", metavar="FILE", help="a local state-dict file to load into a spec MODEL")
    sub.add_argument(
        "--input-size", type=positive_int, metavar="PIXELS",
        help="square input size (default: a checkpoint's own, else 224, 32 for cifar:)",
    )  # fmt: skip
    if example_batch:
        sub.add_argument(
            "--example-batch", type=positive_int, default=1, metavar="N",
            help="images in the random example input the model is traced (and verified) on (default 1)",
        )  # fmt: skip
    sub.add_argument("--seed", type=int, default=0, help=f"random seed (default 0) of {seed}")
    if checkpoints:
        sub.add_argument("--trust-model-file", action="store_true", help=TRUST_MODEL_FILE_HELP)


def add_submodule_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--module", metavar="PATH",
        help="only this submodule (a dotted path such as backbone.body: a detector's backbone); its input is "
        "recorded by running the model on the example input",
    )  # fmt: skip


def add_policy_argument(sub: argparse.ArgumentParser, default: str, help: str) -> None:
    sub.add_argument("--policy", default=default, help=f"{help}: a policy expression or a .json/.yaml policy file")


# Flags from a settings dataclass


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(annotation) -> tuple[type, bool]:
    """The type of a field's values and whether ``None`` is allowed (``float | None`` -> ``(float, True)``)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) != 1:
            raise UsageError(f"cannot make a flag for a field of type {annotation}")
        return options[0], True
    return annotation, False


def _default(field: dataclasses.Field, defaults):
    if defaults is not None:
        return getattr(defaults, field.name)
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


def add_settings_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults=None,
    skip: Iterable[str] = (),
    aliases: dict[str, tuple[str, ...]] | None = None,
    help: dict[str, str] | None = None,
) -> None:
    """One flag per field of the dataclass ``cls`` (``batch_size`` -> ``--batch-size``), read back by
    ``settings_from_args``.

    Help and choices come from each field's ``metadata`` (``'help'``,
    ``'choices'``) or from ``help``; defaults from ``defaults`` (an instance)
    or the class.  Booleans get ``--name/--no-name``.  ``aliases`` adds older
    spellings; fields in ``skip`` get no flag (another flag supplies them).
    """
    hints = typing.get_type_hints(cls)
    aliases, help = aliases or {}, help or {}
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        names = (_flag(field.name), *aliases.get(field.name, ()))
        kind, _ = _value_type(hints[field.name])
        default = _default(field, defaults)
        text = help.get(field.name) or field.metadata.get("help") or field.name.replace("_", " ")
        if kind is bool:
            action = parser.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction,
                                         default=default)  # fmt: skip
            action.help = f"{text} (default: {'on' if default else 'off'})"  # Python 3.10 would add its own
            continue
        if default is not None and "default" not in text:
            text += f" (default: {default})"
        choices = field.metadata.get("choices")
        parser.add_argument(*names, dest=field.name, type=kind, default=default, choices=choices, help=text,
                            metavar=None if choices else field.name.split("_")[-1].upper())  # fmt: skip


def settings_from_args(cls: type, args: argparse.Namespace, *, defaults=None, **values):
    """The ``cls`` instance the flags of ``add_settings_arguments`` describe; ``values`` set the skipped fields.

    Fields with neither a flag nor a value keep ``defaults``' value (or the
    class default).  The dataclass checks the values (``InvalidInputError``).
    """
    for field in dataclasses.fields(cls):
        if field.name not in values and hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
    return dataclasses.replace(defaults, **values) if defaults is not None else cls(**values)


#: Spellings of Recipe flags from before the flags were generated from the fields.
RECIPE_ALIASES = {"clip_grad_norm": ("--clip-grad",)}


def add_recipe_arguments(sub: argparse.ArgumentParser, defaults=None) -> None:
    """One flag per ``training.Recipe`` field but ``seed`` (the command's ``--seed`` sets it)."""
    from tcnn_fx.training.recipe import Recipe

    group = sub.add_argument_group("fine-tuning recipe (tcnn_fx.training.Recipe, one flag per field)")
    add_settings_arguments(group, Recipe, defaults=defaults, skip=("seed",), aliases=RECIPE_ALIASES)


def recipe_from_args(args: argparse.Namespace, defaults=None, **values):
    from tcnn_fx.training.recipe import Recipe

    return settings_from_args(Recipe, args, defaults=defaults, seed=args.seed, **values)
