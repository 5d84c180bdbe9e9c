"""A 2-d convolution recast as gated multi-head self-attention.

Construction (Cordonnier et al., ICLR 2020): one head per kernel tap.  Head
``k`` attends from every output pixel to the padded input grid with a
positional attention centred on tap ``k``'s offset; its value projection is the
identity and its output projection is tap ``k``'s slice of the convolution
weight, so with one-hot positional maps the layer computes exactly the
convolution.  Attending over the *padded* grid is what makes the borders exact
for every padding mode: a tap that falls in zero padding reads a zero, a tap in
reflect padding reads the reflected pixel, just as ``nn.Conv2d`` does.

Content attention (ConViT's gated positional self-attention, d'Ascoli et al.,
2021): queries from the pixel under the kernel centre, keys from every padded
pixel, mixed per head with the positional map by a learnable gate.  In the
default (exact) parameterisation the gate is the content weight itself and
starts at zero: the content branch adds exactly nothing at initialisation,
while the gate's gradient is non-zero, so training opens it; the query and key
weights are random (not zero) so that once the gate opens they leave the
saddle point that zero query and key weights would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune, skip_init

from tcnn_fx.errors import InvalidInputError, UsageError
from tcnn_fx.layers import native, native_maps, native_projection, workspace
from tcnn_fx.layers.attention_backward import ProjectProduct, attend_gather, scores_softmax
from tcnn_fx.layers.backends import (
    INFERENCE_IMAGES,
    LOG2_E,
    Backend,
    capturing,
    choose,
    gather_bmm,
    gather_onednn,
    onednn_faster,
)
from tcnn_fx.layers.conv_geometry import ConvGeometry
from tcnn_fx.layers.positional import positional_attention, relative_offsets
from tcnn_fx.settings import DictSettings

#: Off-target positional mass per neighbour is ``exp(-locality)``: at 40 the four
#: nearest neighbours together weigh 1.7e-17, below float64 rounding of the target's 1.
EXACT_LOCALITY = 40.0


@dataclass(frozen=True)
class ConvAttentionConfig(DictSettings):
    """How a ``ConvAttention2d`` parameterises and initialises its attention.

    ``locality_strength``
        Initial ``locality`` of every head: the positional score is
        ``-locality * ||r - centre||^2``.  Large values make the positional map
        one-hot (exact); ConViT uses 1.
    ``gate``
        ``'linear'``: the content weight of a head is its gate parameter
        (``0`` = pure positional attention).  ``'sigmoid'``: ConViT's
        parameterisation, content weight ``1 - sigmoid(gate)``, which never
        reaches zero.
    ``gate_init``
        Initial gate parameter of every head.
    ``qk_dim``
        Query/key width per head; ``None`` picks ``in_channels // heads``
        clamped to [8, 32].
    """

    locality_strength: float = EXACT_LOCALITY
    gate: Literal["linear", "sigmoid"] = "linear"
    gate_init: float = 0.0
    qk_dim: int | None = None

    def __post_init__(self) -> None:
        if self.gate not in ("linear", "sigmoid"):
            raise InvalidInputError(f"gate must be 'linear' or 'sigmoid', got {self.gate!r}")
        if not math.isfinite(self.locality_strength) or self.locality_strength <= 0:
            raise InvalidInputError(
                f"locality_strength must be a positive finite number, got {self.locality_strength!r}"
            )
        if self.qk_dim is not None and self.qk_dim < 1:
            raise InvalidInputError(f"qk_dim must be a positive int or None, got {self.qk_dim!r}")

    @classmethod
    def exact(cls, qk_dim: int | None = None) -> ConvAttentionConfig:
        """The default: equal to the convolution at initialisation, to rounding."""
        return cls(qk_dim=qk_dim)

    @classmethod
    def convit(cls, locality_strength: float = 1.0, qk_dim: int | None = None) -> ConvAttentionConfig:
        """ConViT's GPSA settings (``local_init``): locality 1, sigmoid gate with parameter 1.

        Not equal to the convolution at initialisation: 27% of each head's
        attention is content attention and the positional maps are soft.
        """
        return cls(locality_strength=locality_strength, gate="sigmoid", gate_init=1.0, qk_dim=qk_dim)

    @property
    def is_exact(self) -> bool:
        """Whether a layer built with this config reproduces its convolution at initialisation."""
        return self.gate == "linear" and self.gate_init == 0.0 and self.locality_strength >= EXACT_LOCALITY


@dataclass(frozen=True)
class AttentionMaps:
    """Attention of one forward pass, for analysis.

    ``positional`` is ``(heads, queries, keys)``, ``content`` and ``combined``
    are ``(batch, heads, queries, keys)``; queries are output pixels row-major,
    keys are the pixels of a ``key_size`` grid row-major: the input itself for
    zero padding, the padded input for other padding modes.  ``offsets`` is
    ``(queries, keys, 2)``: each key's position relative to its query.
    """

    positional: Tensor
    content: Tensor
    combined: Tensor
    content_weight: Tensor
    offsets: Tensor
    output_size: tuple[int, int]
    key_size: tuple[int, int]

    def mean_distance(self, which: str = "combined") -> Tensor:
        """Mean attention distance per head in pixels (ConViT's non-locality measure), ``(heads,)``.

        Averaged over queries and batch, weighted by attention mass, of the
        ``combined`` maps (what the layer applies), or of its ``positional``
        or ``content`` part alone.
        """
        if which not in ("combined", "positional", "content"):
            raise InvalidInputError(f"which must be 'combined', 'positional' or 'content', not {which!r}")
        maps = getattr(self, which)
        maps = maps[None] if maps.ndim == 3 else maps
        distance = self.offsets.norm(dim=-1).to(maps.dtype)
        # Weighted by attention mass: a zero-padded border tap attends to nothing and has no distance.
        return (maps * distance).sum(dim=(0, 2, 3)) / maps.sum(dim=(0, 2, 3))


def _qk_dim(config: ConvAttentionConfig, in_channels: int, heads: int) -> int:
    return config.qk_dim or min(32, max(8, in_channels // heads))


def _shares_query_pixels(geometry: ConvGeometry, height: int, width: int) -> bool:
    """Whether the query pixels are exactly the key pixels (zero padding, stride 1, output size = input size)."""
    return (
        geometry.padding_mode == "zeros"
        and geometry.stride == (1, 1)
        and geometry.query_origin(height, width) == (0, 0)
        and geometry.output_size(height, width) == (height, width)
    )


def conv2d_mismatch(conv: nn.Conv2d) -> str | None:
    """Why an ``nn.Conv2d`` does not compute ``F.conv2d`` of its own weights (a predicate phrase), or ``None``.

    A subclass overriding ``forward()`` or ``_conv_forward()``, or forward hooks
    (other than pruning's, which only recompute the weight), change what the
    module returns; the attention layer would not reproduce that.
    """
    for attribute in ("forward", "_conv_forward"):
        if getattr(type(conv), attribute) is not getattr(nn.Conv2d, attribute):
            return (
                f"overrides {attribute}(), so its output is not that of nn.Conv2d with its weights; convert "
                "the plain convolution its forward calls, or make the model use nn.Conv2d"
            )
    for attribute in ("_forward_hooks", "_forward_pre_hooks"):
        hooks = [h for h in getattr(conv, attribute).values() if not isinstance(h, prune.BasePruningMethod)]
        if hooks:
            return f"has {attribute} {hooks}, which the attention layer would not run"
    return None


def _reject_unsupported(conv: nn.Module) -> None:
    """Raise a clear error for a module that ``from_conv`` cannot reproduce exactly."""
    if isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        raise UsageError(
            f"{type(conv).__name__} is a transposed convolution; ConvAttention2d reproduces nn.Conv2d only"
        )
    if isinstance(conv, (nn.Conv1d, nn.Conv3d)):
        raise UsageError(f"{type(conv).__name__} is not 2-d; ConvAttention2d reproduces nn.Conv2d only")
    if not isinstance(conv, nn.Conv2d):
        raise UsageError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        raise InvalidInputError(f"{type(conv).__name__}.weight is uninitialised (lazy); run one forward pass first")
    reason = conv2d_mismatch(conv)
    if reason is not None:
        raise InvalidInputError(f"{type(conv).__name__} {reason}")
    if conv.weight.is_complex():
        raise UsageError(
            f"{type(conv).__name__}.weight is complex ({conv.weight.dtype}); only real dtypes are supported"
        )


def _reusable(*params: Tensor) -> bool:
    """Whether a value computed from ``params`` may be cached: no gradient must reach them, nothing is captured."""
    return not capturing() and not (torch.is_grad_enabled() and any(p.requires_grad for p in params))


def _like_input(out: Tensor, x: Tensor) -> Tensor:
    """``out`` in ``x``'s memory format, as ``nn.Conv2d`` answers channels-last input with channels-last output."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


class ConvAttention2d(nn.Module):
    """Multi-head self-attention that equals an ``nn.Conv2d`` at initialisation.

    Takes the same arguments as ``nn.Conv2d`` plus a ``ConvAttentionConfig``
    (``padding`` may also be four ints: top, bottom, left, right); NCHW in,
    NCHW out.  ``weight`` and ``bias`` have ``nn.Conv2d``'s layout
    (tap ``(i, j)`` of ``weight`` is head ``i * kernel_w + j``'s output
    projection).  Use ``from_conv`` to recast a trained convolution.

    Learnable attention parameters: ``centres`` ``(heads, 2)`` and
    ``locality`` ``(heads,)`` of the positional maps, ``gate`` ``(heads,)``,
    ``query_weight`` and ``key_weight`` ``(heads * qk_dim, in_channels)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        config: ConvAttentionConfig | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        geometry = ConvGeometry.resolve(kernel_size, stride, padding, dilation, groups, padding_mode)
        if in_channels % groups or out_channels % groups:
            raise InvalidInputError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        self.config = config if config is not None else ConvAttentionConfig()
        self.geometry = geometry
        self.in_channels = in_channels
        self.out_channels = out_channels
        heads = geometry.num_taps
        self.qk_dim = _qk_dim(self.config, in_channels, heads)
        factory = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *geometry.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.query_weight = nn.Parameter(torch.empty(heads * self.qk_dim, in_channels, **factory))
        self.key_weight = nn.Parameter(torch.empty(heads * self.qk_dim, in_channels, **factory))
        self.centres = nn.Parameter(torch.empty(heads, 2, **factory))
        self.locality = nn.Parameter(torch.empty(heads, **factory))
        self.gate = nn.Parameter(torch.empty(heads, **factory))
        self.reset_parameters()
        self._caches: dict[str, tuple] = {}  # slot: (key, value), see _cached
        # native_projection.signature: whether the compiled projection reproduced the convolution's (_project).
        self._projection_agrees: dict[tuple, bool] = {}

    def reset_parameters(self) -> None:
        """A random convolution (``nn.Conv2d``'s initialisation) and the attention at its initial state."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_attention_parameters()

    def reset_attention_parameters(self) -> None:
        """Positional maps on the kernel taps, gates at ``config.gate_init``, random query and key weights."""
        with torch.no_grad():
            self.centres.copy_(torch.tensor(self.geometry.tap_offsets()).reshape(self.num_heads, 2))
            self.locality.fill_(self.config.locality_strength)
            self.gate.fill_(self.config.gate_init)
        for projection in (self.query_weight, self.key_weight):
            nn.init.kaiming_uniform_(projection, a=math.sqrt(5))  # nn.Linear's default

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: ConvAttentionConfig | None = None) -> ConvAttention2d:
        """Recast ``conv`` as attention with the same weights; ``conv`` is left untouched.

        Raises ``TypeError`` for modules that are not ``nn.Conv2d`` (transposed,
        1-d, 3-d) and ``ValueError`` for convolutions whose output is not
        ``F.conv2d`` of their weights (custom ``forward``, hooks, lazy weights).
        """
        _reject_unsupported(conv)
        return cls.from_weights(ConvGeometry.of(conv), conv.weight, conv.bias, config).train(conv.training)

    @classmethod
    def from_weights(
        cls,
        geometry: ConvGeometry,
        weight: Tensor,
        bias: Tensor | None = None,
        config: ConvAttentionConfig | None = None,
        *,
        adopt: bool = False,
    ) -> ConvAttention2d:
        """The layer equal to ``F.conv2d`` with ``weight``, ``bias`` and ``geometry``, on ``weight``'s device and dtype.

        For convolutions that exist only as a function call in a graph (a
        padding folded in, weights owned by another module).  With ``adopt``
        the layer takes ``weight`` and ``bias`` themselves as its parameters
        instead of copies: for a compiler pass that discards the convolution.
        """
        out_channels, in_per_group = weight.shape[:2]
        if tuple(weight.shape[2:]) != geometry.kernel_size:
            raise InvalidInputError(
                f"weight of shape {tuple(weight.shape)} does not match kernel {geometry.kernel_size}"
            )
        top, bottom, left, right = geometry.padding
        layer = skip_init(
            cls,
            in_per_group * geometry.groups,
            out_channels,
            geometry.kernel_size,
            stride=geometry.stride,
            padding=(top, bottom, left, right),
            dilation=geometry.dilation,
            groups=geometry.groups,
            bias=bias is not None,
            padding_mode=geometry.padding_mode,
            config=config,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.reset_attention_parameters()
        if adopt:
            layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
            if bias is not None:
                layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            return layer
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @staticmethod
    def cost(
        geometry: ConvGeometry,
        in_channels: int,
        out_channels: int,
        height: int,
        width: int,
        *,
        bias: bool = True,
        config: ConvAttentionConfig | None = None,
    ) -> tuple[int, int]:
        """FLOPs per image (as ``torch.utils.flop_counter`` counts them) and parameters of such a layer.

        The FLOPs are the convolution's (the output projection) plus the
        attention products: query and key projections, query-key scores and
        the gather of every channel by every head.
        """
        heads = geometry.num_taps
        qk = _qk_dim(config or ConvAttentionConfig(), in_channels, heads)
        out_h, out_w = geometry.output_size(height, width)
        queries = out_h * out_w
        keys = height * width if geometry.padding_mode == "zeros" else math.prod(geometry.padded_size(height, width))
        query_pixels = keys if _shares_query_pixels(geometry, height, width) else queries
        flops = geometry.conv_flops(in_channels, out_channels, height, width)
        flops += 2 * in_channels * heads * qk * (query_pixels + keys)
        flops += 2 * heads * queries * keys * (qk + in_channels)
        params = out_channels * (in_channels // geometry.groups) * heads + (out_channels if bias else 0)
        params += 2 * heads * qk * in_channels + 4 * heads  # query, key; centres (2), locality, gate
        return flops, params

    @property
    def num_heads(self) -> int:
        return self.geometry.num_taps

    @property
    def groups(self) -> int:
        return self.geometry.groups

    def content_weight(self) -> Tensor:
        """Per-head weight of content attention in the mix, ``(heads,)``: 0 is the convolution's positional map."""
        if self.config.gate == "sigmoid":
            return 1.0 - torch.sigmoid(self.gate)
        return self.gate

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
            f"padding={g.padding}, dilation={g.dilation}, groups={g.groups}, bias={self.bias is not None}, "
            f"padding_mode={g.padding_mode!r}, heads={self.num_heads}, qk_dim={self.qk_dim}, "
            f"gate={self.config.gate!r}"
        )

    @property
    def _image_keys(self) -> bool:
        """Whether keys are the input's own pixels (zero padding) or the padded grid (other modes).

        Zero-padded pixels have zero value, so dropping them from the keys after
        the positional softmax changes nothing but the cost.
        """
        return self.geometry.padding_mode == "zeros"

    def _positional(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        """Positional attention ``(heads, queries, keys)`` for an input of ``height`` x ``width``.

        Computed in at least float32 so half-precision scores cannot overflow.
        Reused across calls while the input size, the dtype and ``centres`` and
        ``locality`` (by storage and version, so optimiser steps, loads and
        moves count) are unchanged; recomputed whenever gradient must reach
        them, and under tracing or compilation, where a cached tensor would be
        baked into the captured graph.
        """
        params = (self.centres, self.locality)
        compute_dtype = torch.promote_types(self.centres.dtype, torch.float32)

        def compute() -> Tensor:
            centres, locality = (p.to(compute_dtype) for p in params)
            return positional_attention(
                self.geometry, centres, locality, height, width, image_keys=self._image_keys
            ).to(dtype)

        if not _reusable(*params):
            return compute()
        return self._cached("positional", (height, width, dtype, *params), compute)

    def _cached(self, slot: str, key: tuple, compute):
        """``compute()`` (without autograd), reused while ``key`` is unchanged; one entry per ``slot``.

        Parameters in ``key`` count by storage, version, dtype and device, so
        optimiser steps, loads and moves invalidate the entry.
        """
        key = tuple((k.data_ptr(), k._version, k.dtype, k.device) if isinstance(k, Tensor) else k for k in key)
        entry = self._caches.get(slot)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = self._caches[slot] = (key, compute())
        return entry[1]

    def _kernel_maps(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The compiled kernel's positional operand and content weights, reused while nothing they depend on moves.

        ``(1 - w) * positional`` per head, transposed to ``(heads, keys,
        queries)`` and zero-padded to whole blocks of the kernel's queries, and
        ``w``.
        """

        def compute() -> tuple[Tensor, Tensor]:
            return native.kernel_operands(self._positional(height, width, torch.float32), self.content_weight().float())

        return self._cached("kernel", (height, width, self.centres, self.locality, self.gate), compute)

    def _pixels(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Query pixels ``(B, C, out_h, out_w)`` and key/value pixels ``(B, C, rows, columns)``, output size.

        Keys and values are the input itself for zero padding, the padded input
        otherwise; queries are the pixels under the kernel centres.  When those
        are exactly the keys, the same tensor is returned for both.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InvalidInputError(
                f"ConvAttention2d expects NCHW input with {self.in_channels} channels, got shape {tuple(x.shape)}"
            )
        g = self.geometry
        height, width = x.shape[-2:]
        out_h, out_w = g.output_size(height, width)
        x = x.contiguous()
        origin = g.query_origin(height, width) if self._image_keys else None
        if origin is not None:
            source, padded = x, x
        else:
            mode = "constant" if g.padding_mode == "zeros" else g.padding_mode
            padded = F.pad(x, g.pad_last_first, mode=mode) if any(g.padding) else x
            source, origin = padded, g.query_anchor()
        keys = x if self._image_keys else padded
        if _shares_query_pixels(g, height, width):
            return keys, keys, (out_h, out_w)
        queries = source[:, :, origin[0] :: g.stride[0], origin[1] :: g.stride[1]][:, :, :out_h, :out_w]
        return queries, keys, (out_h, out_w)

    def _queries_keys(self, queries: Tensor, keys: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """Content queries and keys ``(B, heads * qk_dim, pixels)``, queries scaled by ``scale / sqrt(qk_dim)``.

        A matrix product on the BLAS in inference where oneDNN is not the
        faster (``backends.onednn_faster``); a 1x1 convolution otherwise: under
        autograd (its backward measured faster than the product's), in
        captured graphs and where oneDNN is the faster.  One product for both
        where queries and keys are the same pixels.
        """
        width = self.num_heads * self.qk_dim
        weights = self._qk_weights(scale)  # (2 * width, C): scaled query weights, then key weights
        convolve = torch.is_grad_enabled() or capturing() or onednn_faster()

        def product(weight: Tensor, pixels: Tensor) -> Tensor:
            if convolve:
                return F.conv2d(pixels, weight[:, :, None, None]).flatten(2)
            return torch.matmul(weight, pixels.flatten(2))

        if queries is keys:
            return product(weights, keys).split(width, dim=1)
        return product(weights[:width], queries), product(weights[width:], keys)

    def _qk_weights(self, scale: float) -> Tensor:
        """Query weights scaled by ``scale / sqrt(qk_dim)`` stacked on the key weights; reused in inference."""

        def compute() -> Tensor:
            return torch.cat([self.query_weight * (scale * self.qk_dim**-0.5), self.key_weight])

        if not _reusable(self.query_weight, self.key_weight):
            return compute()
        return self._cached("qk_weights", (scale, self.query_weight, self.key_weight), compute)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """Content queries and keys per head ``(B, heads, qk_dim, pixels)``, key/value pixels, output size."""
        queries, keys, out_size = self._pixels(x)
        q, k = (t.unflatten(1, (self.num_heads, self.qk_dim)) for t in self._queries_keys(queries, keys))
        return q, k, keys, out_size

    def _content(self, q: Tensor, k: Tensor, *, scratch: bool = False) -> Tensor:
        """Content attention ``(B, heads, queries, keys)``: softmax of the query-key products (queries scaled).

        With ``scratch`` (float32 or float64 without autograd) the scores and
        the result are in recycled memory (``workspace``).
        """
        if not scratch:
            scores = torch.matmul(q.transpose(-1, -2), k)
            return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
        return scores_softmax(q, k)[1]

    def _mixed(self, x: Tensor, q: Tensor, k: Tensor, *, scratch: bool) -> Tensor:
        """The maps the layer applies, ``(1 - w) * positional + w * content`` per head, ``(B, heads, queries, keys)``.

        With ``scratch`` (eager inference, recycled memory) in one pass of the
        compiled kernel where it is used (``native_maps``), else composed
        with the content map overwritten by the mix.
        """
        weight = self.content_weight().to(x.dtype)
        if scratch:
            base = self._positional_term(x.shape[-2], x.shape[-1], x.dtype)[0]
            fused = native_maps.content_mix(q, k, base, weight, keep=False)
            if fused is not None:
                return fused[0]
        content = self._content(q, k, scratch=scratch)
        # In eager inference the mix overwrites the content map: one large allocation fewer.
        in_place = not (torch.is_grad_enabled() or capturing())
        return self._mix(x, content, weight.reshape(1, -1, 1, 1), in_place=in_place)

    def _mixed_gathered(self, x: Tensor, q: Tensor, k: Tensor, values: Tensor) -> Tensor | None:
        """``_mixed``'s maps applied to the values ``(B, C, rows, columns)``: ``(B, C, heads, queries)``, in one
        pass of the maps kernel where it gathers (``native_maps.content_mix_gather``), else ``None``."""
        base = self._positional_term(x.shape[-2], x.shape[-1], x.dtype)[0]
        fused = native_maps.content_mix_gather(q, k, base, self.content_weight().to(x.dtype), values.flatten(2))
        return None if fused is None else fused[0]

    def _mix(self, x: Tensor, content: Tensor, weight: Tensor, *, in_place: bool = False) -> Tensor:
        """``(1 - w) * positional + w * content`` per head for input ``x``, in one pass over the content maps.

        The positional term does not depend on the input (``_positional_term``:
        reused across calls; an exported graph holds it as a constant), and at
        ``w = 0`` the result is exactly the positional map.  ``in_place``
        overwrites ``content``.  (``torch.lerp`` would skip the positional term,
        but the ONNX exporter decomposes it into Sub/Mul/Where over the maps,
        which cost a hybrid ResNet-50 a quarter of its attention time in ONNX
        Runtime.)
        """
        base = self._positional_term(x.shape[-2], x.shape[-1], x.dtype)
        return torch.addcmul(base, content, weight, out=content if in_place else None)

    def _positional_term(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        """``(1 - w) * positional`` per head, ``(1, heads, queries, keys)``, reused while nothing it depends on moves."""

        def compute() -> Tensor:
            weight = self.content_weight().to(dtype).reshape(-1, 1, 1)
            return (self._positional(height, width, dtype) * (1 - weight)).unsqueeze(0)

        params = (self.centres, self.locality, self.gate)
        if not _reusable(*params):
            return compute()
        return self._cached("positional_term", (height, width, dtype, *params), compute)

    def forward(self, x: Tensor) -> Tensor:
        backend = choose(x)
        if backend.chunks and x.shape[0] > INFERENCE_IMAGES:
            # A few images at a time: the maps or gathered taps held at once stay those of a few images.  The
            # chunks run below the module call, so hooks see the call they were given.
            return torch.cat([self._images(chunk, backend) for chunk in x.split(INFERENCE_IMAGES)])
        return self._images(x, backend)

    def _images(self, x: Tensor, backend: Backend) -> Tensor:
        """The layer's output on ``x``, its attention computed by ``backend`` (``tcnn_fx.layers.backends``)."""
        if backend is Backend.KERNEL:
            gathered, (out_h, out_w) = self._attend_gather(x, native.attend_gather())
        elif backend is Backend.TRAINING:
            q, k, keys, (out_h, out_w) = self._heads(x)
            positional = self._positional(x.shape[-2], x.shape[-1], x.dtype)
            gathered = attend_gather(q, k, keys.flatten(2), positional, self.content_weight().to(x.dtype))
            out = self._project_product(gathered).reshape(x.shape[0], self.out_channels, out_h, out_w)
            return _like_input(out, x)
        else:
            # Eager CPU inference keeps its maps (and the bmm gather's taps) in recycled memory.
            scratch = x.dtype in (torch.float32, torch.float64) and not torch.is_grad_enabled() and workspace.usable(x)
            q, k, values, (out_h, out_w) = self._heads(x)
            gathered = self._mixed_gathered(x, q, k, values) if scratch else None
            if gathered is None:
                combined = self._mixed(x, q, k, scratch=scratch)
                if backend is Backend.ONEDNN:
                    gathered = gather_onednn(values, combined)
                else:
                    batch, heads, queries = combined.shape[:3]
                    taps = workspace.empty((batch, values.shape[1], heads * queries), x) if scratch else None
                    gathered = gather_bmm(values, combined, out=taps)
        out = self._project(gathered).reshape(x.shape[0], self.out_channels, out_h, out_w)
        return _like_input(out, x)

    def _attend_gather(self, x: Tensor, kernel) -> tuple[Tensor, tuple[int, int]]:
        """What ``_mixed`` and the gather compute, in one compiled pass; and the output size.

        The kernel (``tcnn_fx.layers.native``) computes content scores, softmax,
        mix and gather per block of queries without writing the attention maps
        to memory.
        """
        queries, keys, out_size = self._pixels(x)
        q, k = self._queries_keys(queries, keys, scale=LOG2_E)
        height, width = x.shape[-2:]
        if capturing():  # torch.compile: a cache keyed on storages cannot live in a graph; computed in it
            positional = self._positional(height, width, torch.float32)
            base, weight = native.kernel_operands(positional, self.content_weight().float())
        else:
            base, weight = self._kernel_maps(height, width)
        return kernel(q, k, keys.flatten(2), base, weight, self.num_heads).unsqueeze(0), out_size

    def _project(self, gathered: Tensor) -> Tensor:
        """Every head's output projection of its gathered channels: ``(images, C_out, queries)``.

        Row ``r * heads + head`` of ``gathered`` is head ``head``'s gather
        for image ``r`` (one image per batch entry, or all along the rows).
        The convolution's own arithmetic on the taps (``_project_convolution``),
        or, in CPU inference, the compiled kernel where it has reproduced
        that to the last bit for taps of this signature (``native_projection``:
        checked on the first call of each).
        """
        taps = gathered
        if gathered.shape[2] != self.num_heads:  # images along the rows: (1, C, images * heads, queries)
            taps = gathered[0].unflatten(1, (-1, self.num_heads)).transpose(0, 1)
        if not native_projection.usable(taps):
            return self._project_convolution(gathered)
        ops = self._cached("projection", (self.weight,), lambda: native_projection.operands(self.weight, self.groups))
        signature = native_projection.signature(taps)
        agrees = self._projection_agrees.get(signature)
        if agrees is None:
            reference = self._project_convolution(gathered)
            # Sums of zeros agree in any order: such a call (a warm-up on zeros, say) settles nothing.
            if bool(taps.any()) and bool(self.weight.any()):
                fast = native_projection.project(taps, ops, self.bias, self.out_channels)
                self._projection_agrees[signature] = torch.equal(fast, reference)
            return reference
        if agrees:
            return native_projection.project(taps, ops, self.bias, self.out_channels)
        return self._project_convolution(gathered)

    def _project_convolution(self, gathered: Tensor) -> Tensor:
        """``_project`` as a (heads x 1) convolution with stride (heads, 1): all heads' taps at once with the
        convolution's own weight, reshaped.  oneDNN sums it in the convolution's order, so at init the result is
        the convolution's to the last bit where oneDNN sums both alike."""
        projection = self.weight.reshape(self.out_channels, -1, self.num_heads, 1)
        out = F.conv2d(gathered, projection, self.bias, stride=(self.num_heads, 1), groups=self.groups)
        return out.transpose(1, 2).flatten(0, 1)

    def _project_product(self, gathered: Tensor) -> Tensor:
        """``_project`` as one matrix product per group, ``(B, C_out, queries)``: under autograd it runs forward
        and backward faster than the strided convolution (docs/conv_attention.md, "Training"); it sums in its
        own order, so at initialisation it equals the convolution within float32 rounding, not bit for bit."""
        batch, channels, heads, queries = gathered.shape
        per_group = channels // self.groups * heads
        weight = self.weight.reshape(self.groups, self.out_channels // self.groups, per_group)
        out = ProjectProduct.apply(weight, gathered.reshape(batch, self.groups, per_group, queries))
        out = out.reshape(batch, self.out_channels, queries)
        return out if self.bias is None else out + self.bias[:, None]

    def attention(self, x: Tensor) -> AttentionMaps:
        """The attention maps this layer applies to ``x`` (detached), with the offsets to measure them."""
        with torch.no_grad():
            q, k, _, out_size = self._heads(x)
            content = self._content(q, k)
            weight = self.content_weight().to(x.dtype)
            positional = self._positional(x.shape[-2], x.shape[-1], x.dtype)
            combined = self._mix(x, content, weight.reshape(1, -1, 1, 1))
            height, width = x.shape[-2:]
            offsets = relative_offsets(self.geometry, height, width, image_keys=self._image_keys, device=x.device)
            return AttentionMaps(
                positional=positional,
                content=content,
                combined=combined,
                content_weight=self.content_weight().detach().clone(),
                offsets=offsets,
                output_size=out_size,
                key_size=(height, width) if self._image_keys else self.geometry.padded_size(height, width),
            )
