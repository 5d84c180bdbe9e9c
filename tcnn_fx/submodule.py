"""Submodules: find the part of a model to rewrite, and the inputs it receives inside the model.

A detector or a segmentation model is more than a traceable CNN: its forward
resizes images, loops over proposals and post-processes boxes.  Its backbone
(``backbone.body`` in torchvision's detectors, ``backbone`` in its
segmentation models) is a CNN like any other.  ``rewrite(..., module=PATH)``
rewrites that submodule alone and puts it back into a copy of the whole
model; the submodule's example inputs are what it receives when the model
runs on the model's example inputs, recorded with a forward pre-hook.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.modes import evaluating


class SubmoduleError(InvalidInputError):
    """A module path that does not exist, or a submodule whose inputs cannot be derived; the message says
    what exists or what would work."""


def resolve(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``; an error lists the closest existing paths when there is none."""
    if not isinstance(path, str) or not path:
        raise SubmoduleError(f"module must be a non-empty dotted path such as 'backbone.body', not {path!r}")
    names = [name for name, _ in model.named_modules() if name]
    try:
        return model.get_submodule(path)
    except AttributeError:
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        children = [name for name, _ in model.named_children()]
        hint = f"did you mean {close}?" if close else f"its top-level modules are {children}"
        raise SubmoduleError(f"{type(model).__name__} has no submodule '{path}'; {hint}") from None


def recorded_inputs(model: nn.Module, path: str, example_inputs: tuple) -> tuple[torch.Tensor, ...]:
    """The positional tensors submodule ``path`` receives at its first call when ``model`` runs (eval mode,
    no autograd) on ``example_inputs``.  The model's modes are restored; its weights are not touched."""
    submodule = resolve(model, path)
    calls: list[tuple[tuple, dict]] = []
    called: dict[str, None] = {}  # the neighbours that did run, to say what would work instead

    def record(module, args, kwargs):
        calls.append((args, kwargs))

    def neighbour(name):
        return lambda module, args: called.setdefault(name)

    parts = path.split(".")
    neighbours = {".".join(parts[:i]): None for i in range(1, len(parts))}
    neighbours.update({f"{path}.{name}": None for name, _ in submodule.named_children()})
    handles = [submodule.register_forward_pre_hook(record, with_kwargs=True)]
    handles += [model.get_submodule(name).register_forward_pre_hook(neighbour(name)) for name in neighbours]
    try:
        with evaluating(model), torch.no_grad():
            try:
                model(*example_inputs)
            except Exception as error:  # noqa: BLE001 - re-raised with what would work
                if not calls:
                    raise SubmoduleError(
                        f"running {type(model).__name__} on the example inputs failed before it reached "
                        f"'{path}' ({type(error).__name__}: {error}); pass the submodule's own inputs as module_inputs"
                    ) from error
    finally:
        for handle in handles:
            handle.remove()
    if not calls:
        instead = f"; modules near it that are called: {list(called)}" if called else ""
        raise SubmoduleError(
            f"'{path}' is not called when {type(model).__name__} runs on the example inputs{instead}; "
            "name a module that is called, or pass the submodule's own inputs as module_inputs"
        )
    args, kwargs = calls[0]
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        received = [type(a).__name__ for a in args] + [f"{k}=" for k in kwargs]
        raise SubmoduleError(
            f"'{path}' receives {received}, not positional tensors only, so it cannot be captured on its own; "
            "rewrite a module whose inputs are tensors"
        )
    return tuple(a.detach().clone() for a in args)
