"""Save and load rewritten models.

A checkpoint holds the recipe (base model spec, the rewritten submodule's path
if only one was, policy, layer config, input shapes, and structural passes
applied before the rewrite such as a ViT's convolutional stem) and the state dict, nothing executable: loading rebuilds
the base model, replays those passes and the rewrite and loads the weights
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import fx, nn

from tcnn_fx.errors import CheckpointError
from tcnn_fx.files import atomic_write
from tcnn_fx.layers import ConvAttentionConfig
from tcnn_fx.policy import Policy
from tcnn_fx.rewrite import report_of, rewrite

FORMAT = "tcnn_fx/1"


def save(hybrid: nn.Module, path: str | Path, *, num_classes: int | None = None, conv_stem: dict | None = None) -> None:
    """Write ``hybrid`` (from ``tcnn_fx.rewrite``) to ``path``, atomically.

    ``num_classes``: the base model's head was replaced by one with that many
    outputs before the rewrite (``specs.replace_head``); loading does the same.
    ``conv_stem``: ``passes.conv_stem`` ran before the rewrite with these
    keyword arguments (``widths``, ``remove_block``); loading replays it.
    Initialisation passes need no record: the weights are saved.
    """
    report = report_of(hybrid)
    if report.policy is None:
        raise CheckpointError("the model was rewritten with a Python predicate policy, which cannot be saved")
    payload = {
        "format": FORMAT,
        "spec": report.spec,
        "policy": report.policy,
        "config": report.config,
        "input_shape": list(report.input_shape),
        "input_shapes": [list(shape) for shape in report.input_shapes],
        "module": report.module,
        "fold_norm": report.fold_norm,
        "num_classes": num_classes,
        "conv_stem": conv_stem,
        "state_dict": hybrid.state_dict(),
    }
    with atomic_write(path) as temporary:
        torch.save(payload, temporary)


def _read(path: str | Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tcnn_fx checkpoint (format {FORMAT})")
    return payload


def input_shape(path: str | Path) -> tuple[int, ...]:
    """The example input shape a saved hybrid was rewritten with."""
    return tuple(_read(path)["input_shape"])


def load(path: str | Path, model: nn.Module | None = None) -> fx.GraphModule:
    """Rebuild a saved hybrid; ``model`` is the base model when the checkpoint records no spec."""
    from tcnn_fx.specs import build, replace_head

    payload = _read(path)
    if model is None:
        if not payload["spec"]:
            raise CheckpointError(f"{path} records no model spec: pass the base model, load(path, model=...)")
        model = build(payload["spec"])
    if payload.get("num_classes") is not None:
        replace_head(model, payload["num_classes"])
    inputs = tuple(torch.zeros(shape) for shape in payload.get("input_shapes") or [payload["input_shape"]])
    module = payload.get("module")
    if payload.get("conv_stem") is not None:
        from tcnn_fx.passes.conv_stem import conv_stem

        model, _ = conv_stem(model, inputs, inplace=True, **payload["conv_stem"])
    if payload["fold_norm"]:
        model.eval()  # batch norms were folded in eval mode
    hybrid = rewrite(
        model,
        Policy.from_dict(payload["policy"]),
        None if module else inputs,
        module=module,
        module_inputs=inputs if module else None,
        config=ConvAttentionConfig.from_dict(payload["config"]),
        fold_norm=payload["fold_norm"],
        spec=payload["spec"],
    )
    try:
        hybrid.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match the rebuilt model: {error}") from error
    return hybrid
