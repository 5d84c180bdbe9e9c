"""The geometry of a 2-d convolution, resolved once so every consumer agrees.

A convolution's behaviour at the borders and its output size follow from its
kernel, stride, dilation and padding; PyTorch spreads that logic over
``nn.Conv2d.__init__``, ``F.conv2d`` and ``F.pad``.  ``ConvGeometry`` states it
in one place, with padding resolved to explicit per-side amounts (``'same'``
included), so that the attention layer, the site table and the cost model
compute the same positions and sizes as the convolution itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tcnn_fx.errors import InvalidInputError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(value: int | tuple[int, ...], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise InvalidInputError(
            f"{name} must be an int or a pair of ints{' or four ints' * (name == 'padding')}, got {value!r}"
        )
    return (int(value[0]), int(value[1]))


def _split(total: int) -> tuple[int, int]:
    """Split a total padding as PyTorch does for ``padding='same'``: the odd pixel goes last."""
    return (total // 2, total - total // 2)


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, stride, dilation, groups and per-side padding of a 2-d convolution.

    ``padding`` is ``(top, bottom, left, right)`` in pixels; ``padding_mode``
    says which values fill it (PyTorch's names).  Offsets and positions below
    are in the coordinates of the *padded* input, whose pixel ``(0, 0)`` is
    the top-left corner of the padding.
    """

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    padding_mode: str = "zeros"
    groups: int = 1

    def __post_init__(self) -> None:
        for name in ("kernel_size", "stride", "dilation"):
            values = getattr(self, name)
            if len(values) != 2 or min(values) < 1:
                raise InvalidInputError(f"{name} must be two positive ints, got {values!r}")
        if len(self.padding) != 4 or min(self.padding) < 0:
            raise InvalidInputError(
                f"padding must be four non-negative ints (top, bottom, left, right), got {self.padding!r}"
            )
        if self.padding_mode not in PADDING_MODES:
            raise InvalidInputError(f"padding_mode {self.padding_mode!r} is not one of {PADDING_MODES}")
        if self.groups < 1:
            raise InvalidInputError(f"groups must be a positive int, got {self.groups}")

    @classmethod
    def resolve(
        cls,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> ConvGeometry:
        """Build the geometry from ``nn.Conv2d``-style arguments; ``padding`` may also be (top, bottom, left, right)."""
        kernel = _pair(kernel_size, "kernel_size")
        stride_ = _pair(stride, "stride")
        dilation_ = _pair(dilation, "dilation")
        if isinstance(padding, str):
            if padding == "valid":
                sides = (0, 0, 0, 0)
            elif padding == "same":
                if stride_ != (1, 1):
                    raise InvalidInputError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride {stride_}")
                sides = _split(dilation_[0] * (kernel[0] - 1)) + _split(dilation_[1] * (kernel[1] - 1))
            else:
                raise InvalidInputError(f"padding {padding!r} is not an int, a pair of ints, 'same' or 'valid'")
        elif not isinstance(padding, int) and len(padding) == 4:
            sides = tuple(int(p) for p in padding)
        else:
            ph, pw = _pair(padding, "padding")
            sides = (ph, ph, pw, pw)
        return cls(kernel, stride_, dilation_, sides, padding_mode, groups)

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        """The geometry of an ``nn.Conv2d`` module (its own arguments, nothing inferred)."""
        return cls.resolve(conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)

    @property
    def num_taps(self) -> int:
        """Number of kernel taps, i.e. heads of the equivalent attention layer."""
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def span(self) -> tuple[int, int]:
        """Extent of the dilated kernel in pixels."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))

    @property
    def pad_last_first(self) -> tuple[int, int, int, int]:
        """Padding in ``F.pad`` order: (left, right, top, bottom)."""
        top, bottom, left, right = self.padding
        return (left, right, top, bottom)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        top, bottom, left, right = self.padding
        return (height + top + bottom, width + left + right)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output resolution for an input of ``height`` x ``width``.

        Raises ``ValueError`` when the padded input is smaller than the dilated
        kernel, the case where ``F.conv2d`` fails too.
        """
        padded = self.padded_size(height, width)
        if padded[0] < self.span[0] or padded[1] < self.span[1]:
            raise InvalidInputError(
                f"input {height}x{width} padded to {padded[0]}x{padded[1]} is smaller than "
                f"the dilated kernel {self.span[0]}x{self.span[1]}"
            )
        return tuple((p - s) // st + 1 for p, s, st in zip(padded, self.span, self.stride))

    def query_anchor(self) -> tuple[int, int]:
        """Padded-grid pixel whose features form an output pixel's query: the kernel's centre tap.

        For even kernels the centre falls between pixels; the pixel above and to
        the left of it is taken.
        """
        return tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation))

    def query_origin(self, height: int, width: int) -> tuple[int, int] | None:
        """Input pixel of the first query when every query's centre pixel lies inside the input, else ``None``.

        Queries then read the input directly, without padding it.
        """
        out = self.output_size(height, width)
        origin = (self.query_anchor()[0] - self.padding[0], self.query_anchor()[1] - self.padding[2])
        last = tuple(o + (n - 1) * s for o, n, s in zip(origin, out, self.stride))
        inside = min(origin) >= 0 and last[0] < height and last[1] < width
        return origin if inside else None

    def tap_offsets(self) -> list[tuple[float, float]]:
        """Offset of each kernel tap from the kernel's centre, in pixels, row-major.

        These are the centres of the attention heads: head ``kh * kw_count + kw``
        looks at ``(kh * dilation_h, kw * dilation_w)`` from the kernel's
        top-left pixel, which is this offset from its centre (half-integers for
        even kernels).
        """
        centre = [d * (k - 1) / 2 for k, d in zip(self.kernel_size, self.dilation)]
        return [
            (i * self.dilation[0] - centre[0], j * self.dilation[1] - centre[1])
            for i in range(self.kernel_size[0])
            for j in range(self.kernel_size[1])
        ]

    def conv_flops(self, in_channels: int, out_channels: int, height: int, width: int) -> int:
        """Multiply-accumulates x 2 of the convolution at this input size, per image (bias excluded)."""
        out_h, out_w = self.output_size(height, width)
        return 2 * out_h * out_w * out_channels * (in_channels // self.groups) * self.num_taps
