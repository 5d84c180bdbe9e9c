"""Replace a ViT's patchify stem with a convolutional stem (Xiao et al., arXiv 2106.14881).

The pass finds the patchify convolution (``tokens.find_patch_stem``), puts a
``ConvStem`` in its place that makes the same token grid at the same width,
and optionally removes the last transformer block, as the paper does to keep
FLOPs matched.  It checks that the token tensor keeps its shape and reports
FLOPs and parameters before and after.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.layers import ConvStem, stem_widths
from tcnn_fx.modes import evaluating
from tcnn_fx.timing import count_flops
from tcnn_fx.tokens import TokenModelError, find_attention_sites, find_patch_stem


@dataclass(frozen=True)
class ConvStemReport:
    """What ``conv_stem`` changed, with per-image FLOPs (forward) and parameter counts before and after."""

    stem: str
    patch_size: tuple[int, int]
    widths: tuple[int, ...]
    grid_size: tuple[int, int]
    removed_block: str | None
    flops_before: int  # per image
    flops_after: int
    params_before: int
    params_after: int

    @property
    def flop_ratio(self) -> float:
        return self.flops_after / self.flops_before

    def table(self) -> str:
        removed = f", removed block '{self.removed_block}'" if self.removed_block else ""
        return (
            f"conv stem at '{self.stem}': patch {self.patch_size} -> 3x3/2 widths {list(self.widths)} + 1x1, "
            f"grid {self.grid_size}{removed}\n"
            f"  FLOPs/image {self.flops_before / 1e6:.1f}M -> {self.flops_after / 1e6:.1f}M (x{self.flop_ratio:.3f}), "
            f"params {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M"
        )


def _block_container(model: nn.Module) -> tuple[str, nn.Module]:
    """The ``nn.Sequential``/``nn.ModuleList`` whose children each hold one attention layer: the transformer blocks."""
    sites = [s.name for s in find_attention_sites(model)]
    if not sites:
        raise TokenModelError("the model has no attention layer, so there is no transformer block to remove")
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) < 2:
            continue
        prefix = f"{name}." if name else ""
        children = [f"{prefix}{child}." for child, _ in module.named_children()]
        owners = [[s for s in sites if s.startswith(c)] for c in children]
        if all(len(o) == 1 for o in owners) and sum(map(len, owners)) == len(sites):
            return name, module
    raise TokenModelError(
        f"no block container (a Sequential or ModuleList with one attention layer per child) for {sites}"
    )


def _forward_flops(model: nn.Module, example_inputs: tuple) -> int:
    """FLOPs of one eval-mode forward pass per image, attention included.

    ``nn.MultiheadAttention``'s fused inference path is invisible to the FLOP
    counter (it would count 0), so it is turned off while counting.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with evaluating(model), torch.no_grad():
            return count_flops(lambda: model(*example_inputs)) // example_inputs[0].shape[0]
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def conv_stem(
    model: nn.Module,
    example_inputs: tuple,
    *,
    widths: list[int] | None = None,
    remove_block: bool = False,
    inplace: bool = False,
) -> tuple[nn.Module, ConvStemReport]:
    """``model`` with its patchify stem replaced by a ``ConvStem``; see the module docstring.

    ``widths``: the 3x3 convolutions' output widths (one per factor 2 of the
    patch size); by default ``layers.stem_widths`` (the paper's designs).
    The new stem is freshly initialised; the rest of the model is kept as is.
    """
    original = model
    model = model if inplace else copy.deepcopy(model)
    stem = find_patch_stem(model, example_inputs)
    if stem.kind != "patchify":
        raise TokenModelError(f"'{stem.name}' already is a convolutional stem")
    if stem.patch_size[0] != stem.patch_size[1]:
        raise TokenModelError(f"'{stem.name}' has non-square patches {stem.patch_size}; the stem needs square ones")
    patch = stem.patch_size[0]
    widths = list(widths) if widths is not None else stem_widths(stem.embed_dim, patch)
    if 2 ** len(widths) != patch:
        raise InvalidInputError(
            f"{len(widths)} stride-2 convolutions make {2 ** len(widths)}x{2 ** len(widths)} patches, not {patch}x{patch}"
        )
    old = model.get_submodule(stem.name)
    with torch.no_grad():
        before = old(example_inputs[0]).shape
    flops_before = _forward_flops(original, example_inputs)
    params_before = sum(p.numel() for p in original.parameters())
    new = ConvStem(stem.in_channels, widths, stem.embed_dim, bias=stem.bias).to(old.weight.device, old.weight.dtype)
    with torch.no_grad(), evaluating(new):  # the example must not move the new batch norms
        after = new(example_inputs[0]).shape
    new.train(old.training)  # a fresh stem: it follows the mode of the one it replaces
    if after != before:
        raise TokenModelError(
            f"the conv stem makes tokens of shape {tuple(after)} where '{stem.name}' made {tuple(before)}: the input "
            f"size {tuple(example_inputs[0].shape[-2:])} must be a multiple of the patch size {patch}"
        )
    model.set_submodule(stem.name, new)
    removed = None
    if remove_block:
        name, blocks = _block_container(model)
        removed = f"{name}.{len(blocks) - 1}" if name else str(len(blocks) - 1)
        del blocks[len(blocks) - 1]
    flops_after = _forward_flops(model, example_inputs)
    report = ConvStemReport(
        stem.name,
        stem.patch_size,
        tuple(widths),
        stem.grid_size,
        removed,
        flops_before,
        flops_after,
        params_before,
        sum(p.numel() for p in model.parameters()),
    )
    return model, report
