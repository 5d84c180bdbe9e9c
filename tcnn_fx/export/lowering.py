"""How each ``ConvAttention2d`` is written into an ONNX graph: chosen per layer, then applied to a copy.

A layer computes ``sum_h W_h ((1 - w_h) P_h + w_h A_h) X`` (tap ``h``'s
weights ``W_h``, content weight ``w_h``, positional map ``P_h``, content
attention ``A_h``).  Its own graph (``maps`` + ``matmul``) writes every map,
mixes and gathers them: what PyTorch runs, but memory-bound in a runtime.  Two
facts give cheaper graphs for the same function:

* **positional** ``taps``: where every ``P_h`` is one-hot (to float32
  rounding, checked from the parameters: see ``tap_targets``) on one of the
  kernel's taps, ``sum_h W_h (1 - w_h) P_h X`` *is* a convolution with tap
  weights ``W_h (1 - w_h)`` (summed where heads share a tap), exported as one
  ``Conv``; otherwise ``maps``, the maps computed in the graph.
* **content** ``none`` where every ``w_h`` is zero (the branch adds exactly
  nothing: a layer at initialisation); otherwise over the open heads only,
  either ``matmul`` (``MatMul -> Softmax -> MatMul``, adjacent so that
  runtime fusers can match it) or ``attention`` (ONNX's ``Attention`` op,
  opset >= 23, which fused attention kernels run without writing the maps).

``plan`` is the analysis: per layer, which choices are exact and allowed, and
of those the cheapest by a rough cost model (``estimate``: FLOPs and bytes of
attention maps moved, at the target's rates; not a latency prediction).
``lowered`` is the action: a copy of the model whose layers compute the
chosen graphs (same function: ``to_onnx`` verifies every file against
PyTorch).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.layers.conv_attention import ConvAttention2d
from tcnn_fx.modes import evaluating
from tcnn_fx.settings import DictSettings

POSITIONAL = ("auto", "taps", "maps")
CONTENT = ("auto", "matmul", "attention")
#: The first opset with the standard ``Attention`` op.
ATTENTION_OPSET = 23
#: A positional map counts as one-hot when the mass off its peak, per axis, is below float32's half ulp of 1:
#: float32 then rounds the peak to exactly 1 and the rest to under 3e-8 of it.
ONE_HOT_MASS = 2.0**-24


@dataclass(frozen=True)
class Rates:
    """Rough throughput of a target: FLOP/s, bytes/s of memory traffic, whether attention runs fused."""

    flops: float
    bandwidth: float
    fused_attention: bool


#: ``cpu``: ONNX Runtime's CPU provider on a few cores; ``gpu``: a data-centre GPU (float32 without TF32),
#: whose attention kernels keep the maps on chip.  Only the ratio between the two rates of a target matters.
TARGETS = {
    "cpu": Rates(flops=1e11, bandwidth=2e10, fused_attention=False),
    "gpu": Rates(flops=5e13, bandwidth=4e12, fused_attention=True),
}


@dataclass(frozen=True)
class Lowering(DictSettings):
    """What ``to_onnx`` may write for each attention layer.

    ``target``: ``'cpu'`` or ``'gpu'``, the rates the cost model picks with.
    ``positional``: ``'auto'`` (``taps`` where exact), ``'taps'`` (required:
    an error names a layer where it is not exact) or ``'maps'``.
    ``content``: ``'auto'`` (the cost model's pick among what the opset
    offers), ``'matmul'`` or ``'attention'`` (opset >= 23); a layer whose
    content weights are all zero always gets ``none``.
    """

    target: str = field(
        default="cpu",
        metadata={
            "choices": tuple(TARGETS),
            "help": "ONNX lowering: the runtime the cost model picks each layer's graph for",
        },
    )
    positional: str = field(
        default="auto",
        metadata={
            "choices": POSITIONAL,
            "help": "ONNX lowering of the positional attention: a Conv where exact ('taps'), "
            "the maps ('maps'), or 'auto' (taps where exact, if the cost model agrees)",
        },
    )
    content: str = field(default="auto", metadata={
        "choices": CONTENT, "help": "ONNX lowering of the content attention: MatMul-Softmax-MatMul ('matmul'), "
        "the Attention op ('attention', opset >= 23) or 'auto' (the cost model's pick)"})  # fmt: skip

    def __post_init__(self) -> None:
        for name, allowed in (("target", tuple(TARGETS)), ("positional", POSITIONAL), ("content", CONTENT)):
            if getattr(self, name) not in allowed:
                raise InvalidInputError(f"lowering {name} {getattr(self, name)!r} is not one of {list(allowed)}")

    def check_opset(self, opset: int) -> None:
        if self.content == "attention" and opset < ATTENTION_OPSET:
            raise InvalidInputError(
                f"lowering content='attention' needs the ONNX Attention op, opset >= {ATTENTION_OPSET}; "
                f"export with opset={ATTENTION_OPSET} or content='matmul' (opset {opset} was asked for)"
            )


@dataclass(frozen=True)
class LayerLowering:
    """The graph chosen for one layer: ``positional`` (``taps``/``maps``), ``content`` (``none``/``matmul``/
    ``attention``), the heads whose content weight is non-zero, why, and for ``taps`` the tap each head's map
    is one-hot on (``tap_targets``)."""

    positional: str
    content: str
    open_heads: tuple[int, ...]
    why: str
    targets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.positional == "taps" and self.targets is None:
            raise InvalidInputError("a 'taps' lowering needs the tap of every head (tap_targets)")

    @property
    def is_own_graph(self) -> bool:
        """Whether this is the layer's own graph (maps mixed, one gather), which needs no rewriting."""
        return (self.positional, self.content) == ("maps", "matmul")

    def to_dict(self) -> dict:
        return {"positional": self.positional, "content": self.content, "open_heads": len(self.open_heads),
                "why": self.why}  # fmt: skip


def _axis_target(centre: float, anchor: float, locality: float) -> tuple[float, float]:
    """The key offset a 1-d positional softmax peaks at, and the mass off that peak relative to it.

    Key offsets lie on ``n - anchor`` (integers, or half-integers for even
    kernels); the score of offset ``t`` is ``-locality * (t - centre)^2``.
    """
    target = round(centre + anchor) - anchor
    delta = abs(centre - target)
    steps = torch.arange(1, 64, dtype=torch.float64)
    off = torch.exp(-locality * ((steps - delta) ** 2 - delta**2)) + torch.exp(
        -locality * ((steps + delta) ** 2 - delta**2)
    )
    return target, float(off.sum())


def tap_targets(layer: ConvAttention2d) -> tuple[tuple[int, ...] | None, str]:
    """For each head, the kernel tap its positional map is one-hot on; or ``None`` and why not.

    One-hot means, per axis, the softmax's mass off its peak is below
    ``ONE_HOT_MASS`` relative to the peak (the map then equals the one-hot map
    in float32).  The peak must be one of the kernel's taps: those lie inside
    the padded grid for every output pixel, so the convolution reads what the
    attention reads, borders included, at every input size.
    """
    geometry = layer.geometry
    taps = {offset: index for index, offset in enumerate(geometry.tap_offsets())}
    anchors = [d * (k - 1) / 2 for k, d in zip(geometry.kernel_size, geometry.dilation)]
    centres = layer.centres.detach().double().tolist()
    localities = layer.locality.detach().double().tolist()
    targets = []
    for head, (centre, locality) in enumerate(zip(centres, localities)):
        if not locality > 0:
            return None, f"head {head}'s locality is {locality:g}: its positional map is not one-hot"
        peak = []
        for axis in (0, 1):
            target, off = _axis_target(centre[axis], anchors[axis], locality)
            if off > ONE_HOT_MASS:
                return None, (
                    f"head {head}'s positional map is not one-hot (mass {off:.1e} off its peak along axis {axis}, "
                    f"above {ONE_HOT_MASS:.1e})"
                )
            peak.append(target)
        if tuple(peak) not in taps:
            return None, f"head {head}'s positional map peaks at offset {tuple(peak)}, not on a kernel tap"
        targets.append(taps[tuple(peak)])
    return tuple(targets), "every positional map is one-hot on a kernel tap"


def open_heads(layer: ConvAttention2d) -> tuple[int, ...]:
    """Heads whose content weight is non-zero: the only ones the content branch must compute."""
    return tuple(int(h) for h in torch.nonzero(layer.content_weight().detach()).flatten())


def estimate(
    layer: ConvAttention2d, positional: str, content: str, heads: int, size: tuple[int, int], rates: Rates
) -> float:
    """Rough seconds per image of one lowering of ``layer`` at input ``size`` with ``heads`` open heads.

    FLOPs of the products, plus bytes of the attention maps written and read
    (unless the target fuses attention).  The projection of gathered channels
    costs as much as the convolution per head.
    """
    geometry = layer.geometry
    height, width = size
    queries = math.prod(geometry.output_size(height, width))
    keys = height * width if layer._image_keys else math.prod(geometry.padded_size(height, width))
    channels, out, total = layer.in_channels, layer.out_channels, layer.num_heads
    project = 2 * queries * out * (channels // layer.groups)  # per head
    flops, map_bytes = 0.0, 0.0
    element = layer.weight.element_size()

    def attention(n: int) -> float:
        """FLOPs of ``n`` heads' content attention, projected: query/key projections, scores, gather, projection."""
        return n * (
            project + 2 * queries * keys * (layer.qk_dim + channels) + 2 * channels * layer.qk_dim * (queries + keys)
        )

    if (positional, content) == ("maps", "matmul"):  # the layer's own graph: every head's maps, mixed, one gather
        return attention(total) / rates.flops + 8 * total * queries * keys * element / rates.bandwidth
    if positional == "taps":
        flops += total * project
    else:  # positional maps computed and gathered on their own
        flops += total * (project + 2 * queries * keys * channels)
        map_bytes += 2 * total * queries * keys * element
    if content != "none":
        flops += attention(heads)
        fused = content == "attention" and rates.fused_attention
        map_bytes += 0 if fused else 5 * heads * queries * keys * element
    return flops / rates.flops + map_bytes / rates.bandwidth


def choose(layer: ConvAttention2d, size: tuple[int, int], options: Lowering, opset: int, name: str) -> LayerLowering:
    """The lowering of ``layer`` (called ``name`` in the model) for an input of ``size``; see the module docstring."""
    targets, why_taps = tap_targets(layer)
    if options.positional == "taps" and targets is None:
        raise InvalidInputError(f"lowering positional='taps' is not exact for layer '{name}': {why_taps}; use 'auto'")
    positionals = ["taps"] if targets is not None and options.positional != "maps" else ["maps"]
    heads = open_heads(layer)
    if not heads:
        contents = ["none"]
    elif options.content != "auto":
        contents = [options.content]
    else:
        contents = ["matmul", "attention"] if opset >= ATTENTION_OPSET else ["matmul"]
    if positionals == ["taps"] and options.positional == "auto" and heads:
        positionals.append("maps")  # the mixed maps may still be cheaper when the content branch runs anyway
    rates = TARGETS[options.target]
    costs = {(p, c): estimate(layer, p, c, len(heads), size, rates) for p in positionals for c in contents}
    positional, content = min(costs, key=costs.get)
    why = why_taps if positional == "taps" else (f"maps: {why_taps}" if targets is None else "maps: cheaper here")
    if len(costs) > 1:
        why += f"; estimated cheapest on {options.target} of {len(costs)} choices"
    return LayerLowering(positional, content, heads, why, targets if positional == "taps" else None)


def plan(model: nn.Module, example_inputs: tuple, options: Lowering, opset: int) -> dict[str, LayerLowering]:
    """The lowering of every ``ConvAttention2d`` in ``model``, by module name, at the example's input sizes."""
    sizes = _input_sizes(model, example_inputs)
    return {name: choose(layer, sizes[name], options, opset, name) for name, layer in _layers(model) if name in sizes}


def lowered(model: nn.Module, choices: dict[str, LayerLowering]) -> nn.Module:
    """A copy of ``model`` whose attention layers compute the chosen graphs (the layer's own graph is kept)."""
    model = copy.deepcopy(model)
    for name, choice in choices.items():
        if not choice.is_own_graph:
            model.set_submodule(name, LoweredConvAttention(model.get_submodule(name), choice))
    return model


def _layers(model: nn.Module):
    return ((name, m) for name, m in model.named_modules() if isinstance(m, ConvAttention2d))


def _input_sizes(model: nn.Module, example_inputs: tuple) -> dict[str, tuple[int, int]]:
    """Each attention layer's input height and width on ``example_inputs`` (layers not run are left out)."""
    sizes, hooks = {}, []

    def record(name: str, args: tuple) -> None:
        sizes.setdefault(name, tuple(args[0].shape[-2:]))

    for name, layer in _layers(model):
        hooks.append(layer.register_forward_pre_hook(lambda _, args, name=name: record(name, args)))
    try:
        with evaluating(model), torch.no_grad():
            model(*example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


class LoweredConvAttention(nn.Module):
    """A ``ConvAttention2d`` computed as ``choice`` says, for export: the positional branch as a convolution
    (``taps``) or from the maps (``maps``), plus the content branch over the open heads (unless ``none``).

    Holds the layer (its pixel selection and positional maps are reused) and
    the weights the lowering folds: the taps' convolution weight ``W_h (1 -
    w_h)``, the open heads' query and key weights and projection ``W_h w_h``.
    """

    def __init__(self, layer: ConvAttention2d, choice: LayerLowering) -> None:
        super().__init__()
        if choice.is_own_graph:
            raise InvalidInputError("the maps + matmul lowering is the layer's own graph; keep the layer")
        self.layer = layer
        self.choice = choice
        with torch.no_grad():
            weight = layer.content_weight().detach()
            taps = layer.weight.flatten(2)  # (out, in / groups, heads)
            kept = taps * (1 - weight)
            if choice.positional == "taps":
                folded = torch.zeros_like(taps).index_add_(2, torch.tensor(choice.targets), kept)
                self.register_buffer("positional_weight", folded.reshape(layer.weight.shape))
            else:
                self.register_buffer("positional_weight", kept)
            heads = torch.tensor(choice.open_heads, dtype=torch.long)
            shape = (layer.num_heads, layer.qk_dim, layer.in_channels)
            scaled = layer.query_weight * layer.qk_dim**-0.5  # as the layer scales its queries
            self.register_buffer("query_weight", scaled.reshape(shape)[heads].flatten(0, 1)[:, :, None, None])
            self.register_buffer("key_weight", layer.key_weight.reshape(shape)[heads].flatten(0, 1)[:, :, None, None])
            self.register_buffer("content_projection", taps[:, :, heads] * weight[heads])

    def forward(self, x: Tensor) -> Tensor:
        layer, geometry = self.layer, self.layer.geometry
        if self.choice.positional == "taps":
            mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
            padded = F.pad(x, geometry.pad_last_first, mode=mode) if any(geometry.padding) else x
            out = F.conv2d(padded, self.positional_weight, layer.bias, geometry.stride, 0, geometry.dilation,
                           geometry.groups)  # fmt: skip
            if self.choice.content == "none":
                return out
        queries, keys, (out_h, out_w) = layer._pixels(x)
        if self.choice.positional == "maps":
            maps = layer._positional(x.shape[-2], x.shape[-1], x.dtype)  # (heads, queries, keys)
            gathered = torch.matmul(keys.flatten(2).unsqueeze(1), maps.mT).transpose(1, 2)  # (B, C, heads, queries)
            out = _project(gathered, self.positional_weight, layer.bias, geometry.groups).unflatten(2, (out_h, out_w))
            if self.choice.content == "none":
                return out
        return out + self._content(queries, keys).unflatten(2, (out_h, out_w))

    def _content(self, queries: Tensor, keys: Tensor) -> Tensor:
        """The open heads' content attention, projected: ``(B, out, queries)``."""
        heads = len(self.choice.open_heads)
        q = F.conv2d(queries, self.query_weight).flatten(2).unflatten(1, (heads, -1)).mT  # (B, heads, queries, d)
        k = F.conv2d(keys, self.key_weight).flatten(2).unflatten(1, (heads, -1)).mT  # (B, heads, keys, d)
        values = keys.flatten(2).mT.unsqueeze(1)  # (B, 1, keys, C)
        if self.choice.content == "attention":
            attended = F.scaled_dot_product_attention(q, k, values.expand(-1, heads, -1, -1), scale=1.0)
        else:
            scores = torch.matmul(q, k.mT)
            attention = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
            attended = torch.matmul(attention, values)  # (B, heads, queries, C)
        return _project(attended.permute(0, 3, 1, 2), self.content_projection, None, self.layer.groups)


def _project(gathered: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """``sum_h weight[..., h] @ gathered[:, :, h]``: ``(B, C, heads, queries)`` to ``(B, out, queries)``, as one
    convolution with a (heads x 1) kernel and stride (as ``ConvAttention2d`` projects)."""
    out_channels, per_group, heads = weight.shape[0], weight.shape[1], gathered.shape[2]
    kernel = weight.reshape(out_channels, per_group, heads, 1)
    return F.conv2d(gathered, kernel, bias, stride=(heads, 1), groups=groups).flatten(2)
