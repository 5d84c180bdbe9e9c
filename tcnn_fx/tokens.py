"""What a Vision Transformer is made of: its patchify stem, token grid, positional embeddings and attention layers.

The analysis side of the ViT passes (``passes.attention_init``,
``passes.conv_stem``): it finds things and reads them, it changes nothing.
Attention layers are found by module type, through one accessor per family
(timm's ``Attention``, ``nn.MultiheadAttention`` as torchvision's ViT uses it,
and the content branch of tcnn_fx's ``ConvAttention2d``), so that the passes
see every family as per-head query, key, value and output matrices.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcnn_fx.capture import timm_attention_types
from tcnn_fx.errors import InvalidInputError
from tcnn_fx.layers import ConvAttention2d, ConvStem
from tcnn_fx.policy import COMPARISONS, PolicyError


class TokenModelError(InvalidInputError):
    """The model lacks what a ViT pass needs (attention layers, a patchify stem, usable positional embeddings)."""


# Attention layers


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention layer: where it is, its family and its head layout.

    ``index`` counts attention layers in module order (the block depth in a
    plain ViT).  ``embed_dim`` is the width the queries and keys read.
    """

    name: str
    kind: str  # "timm", "mha" or "conv_attention"
    index: int
    embed_dim: int
    num_heads: int
    head_dim: int
    scale: float
    has_value: bool  # whether value and output projections exist to initialise (not for ConvAttention2d)

    @property
    def width(self) -> int:
        """All heads' query (and key, value) width together."""
        return self.num_heads * self.head_dim


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, timm_attention_types()):
        return "timm"
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, ConvAttention2d):
        return "conv_attention"
    return None


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every self-attention layer of ``model`` tcnn_fx can initialise, in module order."""
    sites = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        if kind == "timm":
            heads, head_dim, embed, scale = module.num_heads, module.head_dim, module.qkv.in_features, module.scale
        elif kind == "mha":
            heads, embed = module.num_heads, module.embed_dim
            head_dim, scale = module.head_dim, module.head_dim**-0.5
        else:
            heads, embed = module.num_heads, module.in_channels
            head_dim = module.qk_dim
            scale = head_dim**-0.5
        sites.append(
            AttentionSite(name, kind, len(sites), embed, heads, head_dim, float(scale), kind != "conv_attention")
        )
    return sites


def _check_projections(site: AttentionSite, module: nn.Module) -> None:
    """Refuse layers whose scores or products the passes would get wrong, naming what is in the way."""
    if site.kind == "timm":
        for norm, what in (("q_norm", "queries"), ("k_norm", "keys")):
            if not isinstance(getattr(module, norm), nn.Identity):
                raise TokenModelError(
                    f"attention '{site.name}' normalises its {what} ({norm}: {type(getattr(module, norm)).__name__}); "
                    "the solved query/key weights would not survive the norm: use a model without qk_norm"
                )
    if site.kind == "mha":
        if not module._qkv_same_embed_dim:
            raise TokenModelError(
                f"nn.MultiheadAttention '{site.name}' has separate kdim/vdim; only self-attention with one packed "
                "in_proj_weight is supported"
            )
        if module.bias_k is not None or module.add_zero_attn:
            raise TokenModelError(
                f"nn.MultiheadAttention '{site.name}' adds key/value biases or a zero key (add_bias_kv, "
                "add_zero_attn): extra keys the passes do not model; use a layer without them"
            )


def _value_output_mismatch(site: AttentionSite, module: nn.Module) -> str | None:
    """Why the value/output product of a timm layer is not ``Wv^T Wo^T`` over ``embed_dim``, if it is not."""
    if site.kind != "timm":
        return None
    if not isinstance(module.norm, nn.Identity):
        return f"it normalises the attention output before the projection (scale_norm: {type(module.norm).__name__})"
    if module.proj.out_features != site.embed_dim:
        return f"its output width {module.proj.out_features} differs from its input width {site.embed_dim} (dim_out)"
    return None


class AttentionWeights:
    """Per-head query/key and whole-layer value/output weights of one attention layer, written in place.

    Shapes: query and key ``(heads, head_dim, embed_dim)`` (rows of the linear
    maps), value ``(heads * head_dim, embed_dim)``, output
    ``(embed_dim, heads * head_dim)``: a token ``x`` scores ``(Wq x) . (Wk x) * scale``.
    """

    def __init__(self, site: AttentionSite, module: nn.Module):
        _check_projections(site, module)
        self.site, self.module = site, module

    def _packed(self) -> tuple[Tensor, Tensor | None]:
        if self.site.kind == "timm":
            return self.module.qkv.weight, self.module.qkv.bias
        return self.module.in_proj_weight, self.module.in_proj_bias

    def _rows(self, which: int) -> Tensor:
        if self.site.kind == "conv_attention":
            return (self.module.query_weight, self.module.key_weight)[which]
        width = self.site.width
        return self._packed()[0][which * width : (which + 1) * width]

    @property
    def dtype(self) -> torch.dtype:
        return self._rows(0).dtype

    @torch.no_grad()
    def set_query_key(self, query: Tensor, key: Tensor) -> None:
        """Write per-head ``(heads, head_dim, embed_dim)`` query and key rows; their biases become zero."""
        for which, value in ((0, query), (1, key)):
            rows = self._rows(which)
            rows.copy_(value.reshape(rows.shape))
        if self.site.kind != "conv_attention":
            bias = self._packed()[1]
            if bias is not None:
                bias[: 2 * self.site.width].zero_()

    @torch.no_grad()
    def set_value_output(self, value: Tensor, output: Tensor) -> None:
        """Write the value ``(inner, embed)`` and output ``(embed, inner)`` projection weights."""
        if not self.site.has_value:
            raise TokenModelError(f"'{self.site.name}' ({self.site.kind}) has no value/output projection to set")
        mismatch = _value_output_mismatch(self.site, self.module)
        if mismatch:
            raise TokenModelError(f"cannot set the value/output product of '{self.site.name}': {mismatch}")
        self._rows(2).copy_(value)
        projection = self.module.proj if self.site.kind == "timm" else self.module.out_proj
        projection.weight.copy_(output)

    def maps(self, tokens: Tensor) -> Tensor:
        """Attention probabilities ``(batch, heads, tokens, tokens)`` for the layer's input ``tokens`` ``(B, L, D)``."""
        if self.site.kind == "conv_attention":
            raise TokenModelError("ConvAttention2d maps come from its own attention() method")
        heads, dim, width = self.site.num_heads, self.site.head_dim, self.site.width
        weight, bias = self._packed()
        qk = F.linear(tokens, weight[: 2 * width], None if bias is None else bias[: 2 * width])
        q, k = qk.reshape(*tokens.shape[:2], 2, heads, dim).permute(2, 0, 3, 1, 4)  # q/k norms are refused
        return torch.softmax(q @ k.transpose(-2, -1) * self.site.scale, dim=-1)


def select_attention(sites: list[AttentionSite], policy) -> list[AttentionSite]:
    """The attention layers a policy chooses.

    ``policy``: ``'all'``, ``'none'``, a glob over layer names
    (``'name:blocks.1*'``), a depth rule (``'depth<4'``, ``'depth>=2'``; depth is
    ``AttentionSite.index``), a list of names, or a callable on ``AttentionSite``.
    Unknown names are errors listing the layers that exist.
    """
    if not sites:
        raise TokenModelError(
            "the model has no self-attention layer tcnn_fx knows (timm Attention, nn.MultiheadAttention, ConvAttention2d)"
        )
    names = [s.name for s in sites]
    if callable(policy) and not isinstance(policy, str):
        return [s for s in sites if policy(s)]
    if isinstance(policy, str):
        if policy in ("all", "none"):
            return list(sites) if policy == "all" else []
        if policy.startswith("name:"):
            chosen = [s for s in sites if fnmatch.fnmatchcase(s.name, policy[5:])]
            if not chosen:
                raise PolicyError(f"'{policy}' matches no attention layer; layers are {names}")
            return chosen
        match = re.fullmatch(r"depth(<=|>=|==|<|>)(\d+)", policy)
        if match:
            compare, depth = COMPARISONS[match.group(1)], int(match.group(2))
            return [s for s in sites if compare(s.index, depth)]
        raise PolicyError(
            f"unknown attention policy {policy!r}; use 'all', 'none', 'name:GLOB', 'depth<N' (<=, >, >=, ==) or a list of names"
        )
    wanted = list(policy)
    missing = [n for n in wanted if n not in names]
    if missing:
        raise PolicyError(f"no attention layer named {missing}; layers are {names}")
    return [s for s in sites if s.name in wanted]


# Patchify stem and token grid


@dataclass(frozen=True)
class PatchStem:
    """What makes the token grid: a patchify convolution (kernel = stride = patch, no padding) or a ``ConvStem``."""

    name: str
    kind: str  # "patchify" or "conv_stem"
    in_channels: int
    embed_dim: int
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    bias: bool


def _is_patchify(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == module.stride
        and max(module.kernel_size) > 1
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
    )


def find_patch_stem(model: nn.Module, example_inputs: tuple) -> PatchStem:
    """The model's token stem: the first patchify ``nn.Conv2d`` (kernel = stride) or ``ConvStem`` reading the image.

    The grid size is the input size of ``example_inputs`` divided by the patch size.
    """
    image = example_inputs[0]
    for name, module in model.named_modules():
        if isinstance(module, ConvStem) and module[0].in_channels == image.shape[1]:
            patch, last = module.stride, module[-1]
            grid = (image.shape[-2] // patch, image.shape[-1] // patch)
            return PatchStem(name, "conv_stem", module[0].in_channels, last.out_channels, (patch, patch), grid,
                             last.bias is not None)  # fmt: skip
    candidates = [(name, m) for name, m in model.named_modules() if _is_patchify(m)]
    candidates = [(n, m) for n, m in candidates if m.in_channels == image.shape[1]]
    if not candidates:
        convs = [f"{n} ({m.kernel_size}/{m.stride})" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][:8]
        raise TokenModelError(
            "no patchify stem (an nn.Conv2d with kernel = stride > 1, no padding, reading the "
            f"{image.shape[1]}-channel image); convolutions: {convs or 'none'}"
        )
    name, conv = candidates[0]
    height, width = image.shape[-2:]
    grid = (height // conv.stride[0], width // conv.stride[1])
    return PatchStem(
        name, "patchify", conv.in_channels, conv.out_channels, conv.kernel_size, grid, conv.bias is not None
    )


def grid_points(grid_size: tuple[int, int]) -> Tensor:
    """``(rows * cols, 2)`` integer (row, column) coordinates of a grid, row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)


@dataclass(frozen=True)
class TokenGrid:
    """How tokens are laid out: ``prefix`` tokens (class, distillation, registers) first, then the grid row-major.

    ``positions`` holds the positional embedding of every grid token
    ``(grid_h * grid_w, embed_dim)``, ``prefix_tokens`` what each prefix token
    is before the first block ``(prefix, embed_dim)``: its learned vector plus
    its position where it has one (detached copies); ``parameter`` names the
    positional embedding.
    """

    grid_size: tuple[int, int]
    prefix: int
    parameter: str
    positions: Tensor
    prefix_tokens: Tensor

    def target_index(self, offset: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """For each grid token (row-major), the grid index of the token at ``offset`` from it, and whether it exists."""
        (h, w), target = self.grid_size, grid_points(self.grid_size) + torch.tensor(offset)
        valid = (target[:, 0] >= 0) & (target[:, 0] < h) & (target[:, 1] >= 0) & (target[:, 1] < w)
        return target[:, 0].clamp(0, h - 1) * w + target[:, 1].clamp(0, w - 1), valid


_POSITION_NAMES = ("pos_embed", "pos_embedding", "position_embedding", "position_embeddings")
#: Learned prefix tokens, in the order timm and torchvision put them in front of the grid.
_PREFIX_NAMES = ("cls_token", "class_token", "dist_token", "reg_token")


def _named_tensors(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, Tensor]]:
    found = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if n.rsplit(".", 1)[-1] in names]
    return sorted(found, key=lambda item: names.index(item[0].rsplit(".", 1)[-1]))


def find_token_grid(model: nn.Module, example_inputs: tuple) -> TokenGrid:
    """The model's token grid, the positional embedding of each grid token and the prefix tokens.

    The embedding is the learned ``(1, L, D)`` parameter (or buffer) whose name
    ends with one of ``pos_embed``, ``pos_embedding``, ``position_embedding(s)``;
    prefix tokens are the ``(1, n, D)`` parameters named ``cls_token``,
    ``class_token``, ``dist_token``, ``reg_token``.  ``L`` must be the grid
    size (prefix tokens without positions, timm's ``no_embed_class``) or the
    grid size plus the prefix tokens placed first, as timm and torchvision lay
    them out; anything else is an error, since the solve would pair the wrong
    positions.
    """
    stem = find_patch_stem(model, example_inputs)
    tokens = math.prod(stem.grid_size)
    found = _named_tensors(model, _POSITION_NAMES)
    if not found:
        raise TokenModelError(
            f"no positional embedding (a parameter named one of {_POSITION_NAMES}): the impulse solve needs "
            "positions to build query/key weights from"
        )
    name, table = found[0]
    if table.dim() != 3 or table.shape[0] != 1 or table.shape[-1] != stem.embed_dim:
        raise TokenModelError(
            f"positional embedding '{name}' has shape {tuple(table.shape)}; expected (1, tokens, {stem.embed_dim})"
        )
    learned = [t.detach()[0] for _, t in _named_tensors(model, _PREFIX_NAMES) if t.dim() == 3 and t.shape[0] == 1]
    prefix_tokens = torch.cat(learned) if learned else table.new_zeros(0, stem.embed_dim)
    with_positions = table.shape[1] - tokens
    if with_positions not in (0, len(prefix_tokens)):
        raise TokenModelError(
            f"positional embedding '{name}' has {table.shape[1]} rows, but the {stem.grid_size} grid of "
            f"'{stem.name}' at this input size has {tokens} tokens and the model has {len(prefix_tokens)} prefix "
            f"tokens ({', '.join(_PREFIX_NAMES)}): the layout (prefix tokens first, then the grid row-major) does not "
            "fit; pass example inputs of the size the model was built for"
        )
    if with_positions:
        prefix_tokens = prefix_tokens + table.detach()[0, :with_positions]
    positions = table.detach()[0, with_positions:].clone()
    return TokenGrid(stem.grid_size, len(prefix_tokens), name, positions, prefix_tokens.clone())
