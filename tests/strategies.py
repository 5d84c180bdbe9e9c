"""Hypothesis strategies for convolution configurations that nn.Conv2d accepts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

from tcnn_fx.layers.conv_geometry import PADDING_MODES


@dataclass(frozen=True)
class ConvCase:
    kwargs: dict
    height: int
    width: int
    batch: int
    seed: int
    magnitude: float

    def conv(self, dtype=torch.float32) -> nn.Conv2d:
        torch.manual_seed(self.seed)
        conv = nn.Conv2d(**self.kwargs).to(dtype)
        if conv.bias is not None:
            with torch.no_grad():
                conv.bias.normal_()  # default init makes the bias small; make it matter
        return conv

    def input(self, dtype=torch.float32) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.batch, self.kwargs["in_channels"], self.height, self.width, generator=generator)
        return (x * self.magnitude).to(dtype)


@st.composite
def conv_cases(draw, max_size: int = 12) -> ConvCase:
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    depthwise = draw(st.booleans())
    if depthwise:
        in_channels = draw(st.integers(1, 6))
        groups, out_channels = in_channels, in_channels * draw(st.integers(1, 2))
    else:
        groups = draw(st.sampled_from([1, 1, 2, 3]))
        in_channels, out_channels = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1, 1) if padding_kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if padding_kind == "int":
        padding = draw(st.integers(0, 4))
        pads = (padding, padding)
    elif padding_kind == "tuple":
        padding = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
        pads = padding
    elif padding_kind == "same":
        padding = "same"
        pads = tuple(d * (k - 1) - d * (k - 1) // 2 for k, d in zip(kernel, dilation))  # the larger side
    else:
        padding, pads = "valid", (0, 0)
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    # The input must hold the dilated kernel once padded, and reflect padding must be smaller than the input.
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    sizes = []
    for span, pad in zip(spans, pads):
        low = max(1, span - 2 * pad, pad + 1)
        sizes.append(draw(st.integers(low, max(low, max_size))))
    return ConvCase(
        kwargs=dict(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=draw(st.booleans()),
            padding_mode=padding_mode,
        ),
        height=sizes[0],
        width=sizes[1],
        batch=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2**16)),
        magnitude=10.0 ** draw(st.integers(-6, 6)),
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The issue's exactness measure: ``max |actual - expected| / max |expected|``."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def term_scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The largest sum of absolute terms an output of a convolution with ``weight`` on ``x`` can have."""
    return x.abs().max() * weight.abs().sum(dim=(1, 2, 3)).max()


def assert_equals_convolution(actual: torch.Tensor, expected: torch.Tensor, x, conv: nn.Conv2d, tolerance: float):
    """The exactness contract: ``max |actual - expected| <= tolerance * max |expected|``.

    Except where the output is under 1% of the scale of the terms it sums
    (they cancel, or every tap is in zero padding and the output is the bias
    alone): rounding is relative to the terms, so there the convolution itself
    is that far from its exact value, and the bound is relative to 1% of the
    terms' scale instead.
    """
    reference = max(expected.abs().max(), 1e-2 * term_scale(x, conv.weight))
    assert (actual - expected).abs().max() <= tolerance * reference
