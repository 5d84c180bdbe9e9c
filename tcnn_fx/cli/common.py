"""What the commands share: the console, MODEL (spec or checkpoint) and ``--policy`` reading, data splits,
output paths checked before any work and written all at once at the end."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from tcnn_fx import checkpoint, specs
from tcnn_fx.errors import (
    FileConflictError,
    InvalidInputError,
    MissingDependencyError,
    MissingFileError,
    ModelSpecError,
    TcnnFxError,
    UnwritablePathError,
    UsageError,
)
from tcnn_fx.policy import Policy

console = Console(width=None if sys.stdout.isatty() else 200)

#: File endings that make MODEL a checkpoint even before the file is looked at (any existing file is one too).
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
POLICY_SUFFIXES = (".json", ".yaml", ".yml")


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


# MODEL


def is_checkpoint(model: str) -> bool:
    """Whether MODEL names a checkpoint file (by its ending, or because the file exists) rather than a spec."""
    return model.endswith(CHECKPOINT_SUFFIXES) or Path(model).is_file()


def input_size(args) -> int:
    """``--input-size``, else the checkpoint's recorded input size, else the spec's default."""
    if args.input_size:
        return args.input_size
    if is_checkpoint(args.model):
        return checkpoint.read_recipe(args.model).input_shape[-1]
    return specs.default_input_size(_spec(args.model))


def _spec(model: str) -> str:
    if ":" not in model:
        raise ModelSpecError(
            f"MODEL {model!r} is neither a model spec (torchvision:NAME, timm:NAME, cifar:resnetDEPTH, "
            "path/to/file.py:factory) nor a checkpoint file (.safetensors or .pt)"
        )
    return model


def model_and_policy(model: str) -> tuple[str, dict | None]:
    """What MODEL is, for titles: a checkpoint's recorded spec and policy (never its path), else the spec itself."""
    if not is_checkpoint(model):
        return model, None
    recipe = checkpoint.read_recipe(model)
    return recipe.spec or "an unnamed model", recipe.policy


def load_model(args, *, example_batch: int = 1) -> tuple[nn.Module, tuple]:
    """The model MODEL names (a spec, or a checkpoint written by ``convert``/``finetune``), in eval mode, and a
    random example input of ``example_batch`` images.

    ``--seed`` seeds the random draws: a spec model's initial weights (those
    ``--weights`` does not replace, a new ``--num-classes`` head) and the example input.
    """
    torch.manual_seed(args.seed)
    num_classes = getattr(args, "num_classes", None)
    if is_checkpoint(args.model):
        for flag, value in (("--weights", args.weights), ("--num-classes", num_classes)):
            if value is not None:
                raise UsageError(
                    f"{flag} applies to a model spec; MODEL {args.model} is a checkpoint, which brings its own "
                    "weights and classifier head"
                )
        with console.status(f"loading {args.model}"):
            model = checkpoint.load(args.model, trust_model_file=getattr(args, "trust_model_file", False))
    else:
        with console.status(f"building {args.model}"):
            model = specs.build(_spec(args.model))
            if args.weights is not None:
                load_weights(model, args.weights)
            if num_classes is not None:
                specs.replace_head(model, num_classes)
    size = input_size(args)
    return model.eval(), (torch.randn(example_batch, 3, size, size),)


def load_weights(model: nn.Module, path: str) -> None:
    """``specs.load_weights``; a tcnn_fx checkpoint given in place of a state dict is named as one."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--weights {path} does not exist")
    try:
        specs.load_weights(model, path)
    except (TcnnFxError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as error:
        try:
            spec = checkpoint.read_recipe(path).spec
        except TcnnFxError:
            if isinstance(error, TcnnFxError):
                raise error from None
            reason = one_line(error)[:300] or type(error).__name__
            raise ModelSpecError(f"--weights {path} cannot be read as a state dict ({reason})") from error
        raise ModelSpecError(
            f"--weights {path} is a tcnn_fx checkpoint (of {spec or 'an unnamed model'}), not a state dict: "
            "give it as MODEL instead"
        ) from error


def check_classes(model: nn.Module, inputs: tuple, classes: list[str], data: str) -> None:
    """Refuse a dataset whose class count is not the model's output count (naming both, and the fix)."""
    with torch.no_grad():
        outputs = model(*inputs).shape[-1]
    if outputs != len(classes):
        raise InvalidInputError(
            f"the model has {outputs} outputs but {data} has {len(classes)} classes; "
            f"pass --num-classes {len(classes)} to replace the classifier head"
        )


# --policy


def parse_policy(text: str) -> Policy:
    """A policy expression, or a ``.json``/``.yaml`` policy file; checked for syntax before any model is built."""
    return Policy.load(text) if text.endswith(POLICY_SUFFIXES) else Policy(select=text)


# Data


def report_skipped(split) -> None:
    if split.skipped:
        console.print(f"[yellow]skipped {len(split.skipped)} undecodable images in {split.root}[/]")


def training_splits(args, model: nn.Module, inputs: tuple, train_per_class: int | None, eval_per_class: int | None):
    """Train and evaluation splits of ``--data`` for ``model`` (classes checked), optionally class-balanced samples."""
    from tcnn_fx.training import Preprocessing, balanced_subset, load_splits

    with console.status(f"reading {args.data}"):
        train, evaluation = load_splits(args.data, Preprocessing(input_size(args)), in_memory=args.in_memory)
    for split in (train, evaluation):
        report_skipped(split)
    check_classes(model, inputs, train.classes, args.data)
    if train_per_class:
        train = torch.utils.data.Subset(train, balanced_subset(train.targets, train_per_class, seed=0))
    if eval_per_class:
        evaluation = torch.utils.data.Subset(evaluation, balanced_subset(evaluation.targets, eval_per_class, seed=0))
    return train, evaluation


def evaluation_split(args):
    """The evaluation split (val/ or test/) of ``--data``, decoded into memory, and its preprocessing."""
    from tcnn_fx.training import ImageFolderData, Preprocessing, find_splits

    preprocessing = Preprocessing(input_size(args))
    with console.status(f"reading {args.data}"):
        split = ImageFolderData(find_splits(args.data)[1], preprocessing.eval(), in_memory=True)
    report_skipped(split)
    if not len(split):
        raise InvalidInputError(f"the evaluation split {split.root} of --data {args.data} holds no image")
    return split, preprocessing


# Outputs


def check_output_file(path: str | None, flag: str) -> Path | None:
    """Refuse, before any work, an output file that cannot be written: its folder missing, a file, not writable."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise FileConflictError(f"{flag} {path} is a folder; name a file")
    folder = path.parent
    if not folder.is_dir():
        if folder.exists():
            raise UnwritablePathError(f"{flag} {path}: {folder} is a file, not a folder")
        raise MissingFileError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UnwritablePathError(f"{flag} {path}: folder {folder} is not writable")
    return path


def check_output_folder(path: str, flag: str) -> Path:
    """Refuse, before any work, an output folder that cannot be made: a file in its place or above it, or no
    write permission where it would be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileConflictError(f"{flag} {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UnwritablePathError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise UnwritablePathError(f"{flag} {path}: folder {existing} is not writable")
    return path


def add_report_outputs(sub, json_help: str, plot_help: str) -> None:
    """``--json FILE`` and ``--plot FILE``, for commands that print a table and may also save it and a figure."""
    sub.add_argument("--json", metavar="FILE", help=json_help)
    sub.add_argument("--plot", metavar="FILE", help=plot_help)


def check_report_outputs(args) -> None:
    """``--json`` and ``--plot`` writable and matplotlib present for ``--plot``, before any work."""
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    require_matplotlib("--plot", args.plot)


def require_matplotlib(flag: str, value: str | None) -> None:
    if value is not None and importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError(f"{flag} {value} needs matplotlib: pip install matplotlib")


class Outputs:
    """Output files written to temporary files beside them, renamed into place together when the command succeeds.

    A command that fails (or is interrupted) leaves no partial output: the
    temporary files are removed and the targets are untouched.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, str] = {}

    def stage(self, path: str | Path) -> str:
        """A temporary path to write ``path``'s contents to (same folder, same ending, so writers see the format)."""
        path = Path(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}", dir=path.parent)
        os.close(handle)
        self._staged[path] = temporary
        return temporary

    def write_text(self, path: str | Path, text: str) -> None:
        Path(self.stage(path)).write_text(text)

    def commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for path, temporary in self._staged.items():
            os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes files private; outputs get the usual permissions
            os.replace(temporary, path)
        self._staged.clear()

    def discard(self) -> None:
        for temporary in self._staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        self._staged.clear()


@contextlib.contextmanager
def outputs() -> Iterator[Outputs]:
    """Stage output files in the body; all are put in place if it succeeds, none if it fails."""
    staged = Outputs()
    try:
        yield staged
        staged.commit()
    finally:
        staged.discard()
