"""A convolutional stem for Vision Transformers (Xiao et al., "Early Convolutions Help Transformers See Better").

Instead of one patchify convolution (kernel = stride = p), a stack of 3x3
stride-2 convolutions with batch norm and ReLU, then a 1x1 convolution to the
embedding width: the same token grid and width, with the early visual
processing a CNN does.
"""

from __future__ import annotations

import math

from torch import nn

from tcnn_fx.errors import InvalidInputError


def stem_widths(embed_dim: int, patch_size: int) -> list[int]:
    """Widths of the 3x3 stride-2 convolutions for an ``embed_dim``-wide ViT with ``patch_size`` patches.

    One convolution per factor 2 of the patch size, widths doubling up to
    ``embed_dim``: the paper's designs (192 wide, 16x16 patches: 24, 48, 96,
    192; 384 wide: 48, 96, 192, 384) and the same rule for other sizes, rounded
    to multiples of 8 (at least 8).
    """
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise InvalidInputError(
            f"patch size {patch_size} is not a power of 2: a stack of stride-2 convolutions cannot make that grid"
        )
    depth = int(math.log2(patch_size))
    return [max(8, round(embed_dim / 2 ** (depth - 1 - i) / 8) * 8) for i in range(depth)]


class ConvStem(nn.Sequential):
    """``len(widths)`` x (3x3 stride-2 conv, BN, ReLU), then a 1x1 conv to ``embed_dim`` (with bias, like the patchify conv)."""

    def __init__(self, in_channels: int, widths: list[int], embed_dim: int, *, bias: bool = True):
        if not widths:
            raise InvalidInputError("a convolutional stem needs at least one 3x3 stride-2 convolution")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers.append(nn.Conv2d(channels, embed_dim, 1, bias=bias))
        super().__init__(*layers)
        self.widths = tuple(widths)

    @property
    def stride(self) -> int:
        return 2 ** len(self.widths)
