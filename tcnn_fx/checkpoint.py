"""Save and load rewritten models without running code from the file.

A checkpoint is one safetensors file: the hybrid's tensors, and its
``RewriteRecipe`` as JSON in the file's metadata (``tcnn_fx.recipe``).
safetensors holds tensors and strings only, so reading a checkpoint never
unpickles anything.  Loading rebuilds the base model from the recipe's spec,
replays the structural passes and the rewrite, and copies the tensors in.

Threat model (docs/compiler.md, "Checkpoints"): a checkpoint may come from
someone else.  ``load`` runs library code the caller has installed
(torchvision, timm, tcnn_fx) to build the base model it names; it never
runs a Python file a checkpoint names (a ``path/to/file.py:factory`` spec)
unless the caller passes the base model itself (``load(path, model=...)``)
or opts in with ``trust_model_file=True`` (CLI ``--trust-model-file``); even
then the file must have the SHA-256 the checkpoint recorded.  Checkpoints
of the earlier format (``torch.save`` of a dict) are read with
``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from tcnn_fx import meta
from tcnn_fx.errors import CheckpointError, InvalidInputError, MissingFileError
from tcnn_fx.files import atomic_write
from tcnn_fx.layers import ConvAttentionConfig
from tcnn_fx.policy import Policy
from tcnn_fx.recipe import RewriteRecipe
from tcnn_fx.rewrite import rewrite
from tcnn_fx.specs import build, file_digest, is_file_spec, replace_head

FORMAT = "tcnn_fx/2"
LEGACY_FORMAT = "tcnn_fx/1"
RECIPE_KEY = "tcnn_fx.recipe"


def save(hybrid: nn.Module, path: str | Path, *, num_classes: int | None = None, conv_stem: dict | None = None) -> None:
    """Write ``hybrid`` (from ``tcnn_fx.rewrite``) to ``path`` as a safetensors checkpoint, atomically.

    ``num_classes``: the base model's head was replaced by one with that many
    outputs before the rewrite (``specs.replace_head``); loading does the same.
    ``conv_stem``: ``passes.conv_stem`` ran before the rewrite with these
    keyword arguments (``widths``, ``remove_block``); loading replays it.
    Initialisation passes need no record: the weights are saved.
    """
    recipe = meta.recipe_of(hybrid)
    if recipe.policy is None:
        raise CheckpointError("the model was rewritten with a Python predicate policy, which cannot be saved")
    recipe = recipe.replace(num_classes=num_classes, conv_stem=conv_stem)
    metadata = {"format": FORMAT, RECIPE_KEY: json.dumps(recipe.to_dict())}
    with atomic_write(path) as temporary:
        safetensors.torch.save_model(hybrid, temporary, metadata=metadata)


def read_recipe(path: str | Path) -> RewriteRecipe:
    """The recipe of a checkpoint (either format), read without building anything."""
    return _open(path)[0]


def _open(path: str | Path) -> tuple[RewriteRecipe, dict | None]:
    """The recipe, and the legacy format's state dict (``None`` for safetensors: read at load)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    with path.open("rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04":
        return _open_legacy(path)
    if len(head) == 9 and head[8:9] == b"{":
        try:
            with safetensors.safe_open(str(path), "pt") as file:
                metadata = file.metadata() or {}
        except Exception as error:
            raise CheckpointError(f"{path} is damaged or not a safetensors file ({_one_line(error)})") from error
        if metadata.get("format") != FORMAT or RECIPE_KEY not in metadata:
            raise CheckpointError(f"{path} is a safetensors file but not a tcnn_fx checkpoint (format {FORMAT})")
        try:
            return RewriteRecipe.from_dict(json.loads(metadata[RECIPE_KEY])), None
        except (json.JSONDecodeError, InvalidInputError) as error:
            raise CheckpointError(f"{path}: its recipe cannot be read ({_one_line(error)})") from error
    raise CheckpointError(f"{path} is not a tcnn_fx checkpoint (a safetensors file written by tcnn_fx.save)")


def _open_legacy(path: Path) -> tuple[RewriteRecipe, dict]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({_one_line(error)})") from error
    if not isinstance(payload, dict) or payload.get("format") != LEGACY_FORMAT:
        raise CheckpointError(f"{path} is not a tcnn_fx checkpoint (formats {FORMAT}, {LEGACY_FORMAT})")
    recipe = RewriteRecipe(
        spec=payload["spec"], module=payload.get("module"), policy=payload["policy"], config=payload["config"],
        fold_norm=payload["fold_norm"], num_classes=payload.get("num_classes"), conv_stem=payload.get("conv_stem"),
        input_shapes=tuple(tuple(s) for s in payload.get("input_shapes") or [payload["input_shape"]]),
    )  # fmt: skip
    return recipe, payload["state_dict"]


def load(path: str | Path, model: nn.Module | None = None, *, trust_model_file: bool = False) -> nn.Module:
    """Rebuild a saved hybrid.

    ``model`` is the base model (as it was before the rewrite); without it
    the base model is built from the checkpoint's spec.  A spec naming a
    Python file is only run with ``trust_model_file=True``, and only if the
    file's SHA-256 is the one recorded.  ``model`` itself is not changed.
    """
    recipe, legacy_state = _open(path)
    if model is None:
        if not recipe.spec:
            raise CheckpointError(f"{path} records no model spec: pass the base model, load(path, model=...)")
        if is_file_spec(recipe.spec):
            _check_trusted_file(path, recipe, trust_model_file, file_digest(recipe.spec))
        model = build(recipe.spec)
    else:
        model = copy.deepcopy(model)
    if recipe.num_classes is not None:
        replace_head(model, recipe.num_classes)
    dtype = getattr(torch, recipe.input_dtype, torch.float32)
    inputs = tuple(torch.zeros(shape, dtype=dtype) for shape in recipe.input_shapes)
    if recipe.conv_stem is not None:
        from tcnn_fx.passes.conv_stem import conv_stem

        model, _ = conv_stem(model, inputs, inplace=True, **recipe.conv_stem)
    if recipe.fold_norm:
        model.eval()  # batch norms were folded in eval mode
    if dtype.is_floating_point:
        model.to(dtype)
    try:
        hybrid = rewrite(
            model,
            Policy.from_dict(recipe.policy),
            None if recipe.module else inputs,
            module=recipe.module,
            module_inputs=inputs if recipe.module else None,
            config=ConvAttentionConfig.from_dict(recipe.config),
            fold_norm=recipe.fold_norm,
            leaf_modules=recipe.leaf_modules(model),
            spec=recipe.spec,
        )
    except InvalidInputError as error:
        raise CheckpointError(f"{path} does not fit the base model: {_one_line(error)}") from error
    _load_tensors(hybrid, path, legacy_state)
    return hybrid


def _check_trusted_file(path, recipe: RewriteRecipe, trusted: bool, digest: str | None) -> None:
    source = recipe.spec.rpartition(":")[0]
    if not trusted:
        raise CheckpointError(
            f"{path} names the Python file {source} as its base model; loading would run that file. "
            f"Pass the base model yourself (load(path, model=...)), or if you trust {source}, "
            "load(path, trust_model_file=True) (CLI: --trust-model-file)"
        )
    if digest is None:
        raise MissingFileError(f"{path} names the model file {source}, which does not exist here")
    if recipe.spec_sha256 is not None and digest != recipe.spec_sha256:
        raise CheckpointError(
            f"{source} has changed since {path} was saved (SHA-256 {digest[:12]}..., recorded "
            f"{recipe.spec_sha256[:12]}...); pass the base model yourself: load(path, model=...)"
        )


def _load_tensors(hybrid: nn.Module, path, legacy_state: dict | None) -> None:
    try:
        if legacy_state is not None:
            hybrid.load_state_dict(legacy_state)
        else:
            missing, unexpected = safetensors.torch.load_model(hybrid, str(path), strict=False)
            if missing or unexpected:
                raise CheckpointError(
                    f"{path} does not match the rebuilt model: missing {sorted(missing)[:8]}, "
                    f"unexpected {sorted(unexpected)[:8]}"
                )
    except (RuntimeError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"{path} does not match the rebuilt model: {_one_line(error)}") from error


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:600]
