"""Model specs: build a model from a string such as ``torchvision:resnet50``, ``timm:resnetrs50``,
``cifar:resnet20`` or ``path/to/file.py:factory``, and load weights into it.

Nothing is downloaded: library models are built with random weights (torchvision
detection and segmentation models with a random backbone too), and
``weights`` names a local file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
from pathlib import Path

import torch
from torch import nn

from tcnn_fx.errors import MissingFileError, ModelSpecError, UsageError
from tcnn_fx.models import cifar_resnet

#: The input size each source of models expects by default.
DEFAULT_INPUT_SIZE = {"cifar": 32}


def parse(spec: str) -> tuple[str, str]:
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ModelSpecError(
            f"model spec {spec!r} is not SOURCE:NAME; use torchvision:NAME, timm:NAME, cifar:resnetDEPTH "
            "or path/to/file.py:factory"
        )
    return source, name


def is_file_spec(spec: str) -> bool:
    """Whether ``spec`` names a Python file (``path/to/file.py:factory``): building it runs that file."""
    return parse(spec)[0].endswith(".py")


def file_digest(spec: str) -> str | None:
    """The SHA-256 of the Python file a file spec names (``None`` for library specs or a missing file)."""
    path = Path(parse(spec)[0])
    if not is_file_spec(spec) or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_input_size(spec: str) -> int:
    return DEFAULT_INPUT_SIZE.get(parse(spec)[0], 224)


def build(spec: str, *, num_classes: int | None = None) -> nn.Module:
    """The model ``spec`` names, with fresh random weights."""
    source, name = parse(spec)
    extra = {} if num_classes is None else {"num_classes": num_classes}
    if source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ModelSpecError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, **_no_downloads(torchvision.models.get_model_builder(name)), **extra)
    if source == "timm":
        import timm

        if not timm.is_model(name):
            raise ModelSpecError(f"timm has no model {name!r}; see timm.list_models()")
        return timm.create_model(name, pretrained=False, **extra)
    if source == "cifar":
        match = re.fullmatch(r"resnet(\d+)", name)
        if not match:
            raise ModelSpecError(f"cifar models are resnetDEPTH (resnet20, resnet56, ...), not {name!r}")
        return cifar_resnet(int(match.group(1)), **extra)
    if source.endswith(".py"):
        return _from_file(Path(source), name, extra)
    raise ModelSpecError(f"unknown model source {source!r} in {spec!r}; use torchvision, timm, cifar or a .py file")


def _no_downloads(builder) -> dict:
    """Keyword arguments that keep a torchvision builder from fetching weights: detection and segmentation
    models default to an ImageNet backbone (``weights_backbone``), which would be downloaded."""
    parameters = inspect.signature(builder).parameters
    return {name: None for name in ("weights", "weights_backbone") if name in parameters}


def _from_file(path: Path, factory: str, extra: dict) -> nn.Module:
    if not path.is_file():
        raise MissingFileError(f"model file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, factory):
        raise ModelSpecError(
            f"{path} has no {factory!r}; it defines {sorted(n for n in vars(module) if not n.startswith('_'))}"
        )
    model = getattr(module, factory)(**extra)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{path}:{factory} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict file into ``model`` (strictly), accepting ``{'state_dict': ...}`` and ``module.`` prefixes."""
    if not Path(path).is_file():
        raise MissingFileError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated zips, refused pickles, foreign formats alike
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise ModelSpecError(f"weights file {path} is not a readable state dict ({reason})") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelSpecError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ModelSpecError(f"weights {path} do not match {type(model).__name__}: {error}") from error
    if result.missing_keys or result.unexpected_keys:
        raise ModelSpecError(
            f"weights {path} do not match {type(model).__name__}: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return model


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a fresh classifier with ``num_classes`` outputs, in place.

    timm models reset their own classifier; otherwise the last ``nn.Linear``
    (in module order) is the head and is replaced by a new one of the same
    input width.
    """
    if num_classes < 1:
        raise ModelSpecError(f"num_classes must be at least 1, not {num_classes}")
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return model
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelSpecError(
            f"{type(model).__name__} has no nn.Linear classifier to replace with {num_classes} outputs"
        )
    name, head = linears[-1]
    model.set_submodule(name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
    return model


def load_model(spec: str, weights: str | Path | None = None, *, num_classes: int | None = None) -> nn.Module:
    """Build the model ``spec`` names, load ``weights`` into it if given, then replace its head if asked."""
    model = build(spec)
    if weights is not None:
        load_weights(model, weights)
    return replace_head(model, num_classes) if num_classes is not None else model
