"""Positional attention over a padded feature grid, one head per kernel tap.

Each head scores a key by ``-locality * ||r - centre||^2``, where ``r`` is the
key's position relative to the query (Cordonnier et al., 2020; ConViT's GPSA
uses the same quadratic form).  The score separates into a row term and a
column term, so the softmax over the 2-d grid is the outer product of two 1-d
softmaxes: that is both cheaper and more accurate than a softmax over the
flattened grid, and it gives an exactly one-hot map for a large locality.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tcnn_fx.layers.conv_geometry import ConvGeometry


def _axis_offsets(
    geometry: ConvGeometry, axis: int, out_len: int, padded_len: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Key position minus query position along one axis, shape ``(out_len, padded_len)``.

    A query (output pixel ``i``) sits at the kernel centre, ``i * stride +
    dilation * (kernel - 1) / 2`` in padded coordinates; keys are the padded
    grid's pixels.
    """
    centre = geometry.dilation[axis] * (geometry.kernel_size[axis] - 1) / 2
    queries = torch.arange(out_len, device=device, dtype=dtype) * geometry.stride[axis] + centre
    keys = torch.arange(padded_len, device=device, dtype=dtype)
    return keys.unsqueeze(0) - queries.unsqueeze(1)


def relative_offsets(geometry: ConvGeometry, height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Offsets from every query to every key, shape ``(out_h * out_w, padded_h * padded_w, 2)``.

    Used to measure attention distances; the attention itself never
    materialises this tensor.
    """
    out_h, out_w = geometry.output_size(height, width)
    pad_h, pad_w = geometry.padded_size(height, width)
    rows = _axis_offsets(geometry, 0, out_h, pad_h, device, dtype)
    cols = _axis_offsets(geometry, 1, out_w, pad_w, device, dtype)
    grid = torch.stack(
        torch.broadcast_tensors(rows[:, None, :, None], cols[None, :, None, :]),
        dim=-1,
    )
    return grid.reshape(out_h * out_w, pad_h * pad_w, 2)


def positional_attention(
    geometry: ConvGeometry, centres: Tensor, locality: Tensor, height: int, width: int
) -> Tensor:
    """Attention of every head from every output pixel to every padded-grid pixel.

    ``centres`` is ``(heads, 2)`` (row, column offsets from the query),
    ``locality`` is ``(heads,)``.  Returns ``(heads, out_h * out_w, padded_h *
    padded_w)`` in the dtype of ``centres``; each row sums to one.
    """
    out_h, out_w = geometry.output_size(height, width)
    pad_h, pad_w = geometry.padded_size(height, width)
    heads = centres.shape[0]
    factors = []
    for axis, (out_len, padded_len) in enumerate(((out_h, pad_h), (out_w, pad_w))):
        offsets = _axis_offsets(geometry, axis, out_len, padded_len, centres.device, centres.dtype)
        scores = -locality[:, None, None] * (offsets.unsqueeze(0) - centres[:, axis, None, None]).square()
        factors.append(scores.softmax(dim=-1))
    rows, cols = factors  # (heads, out_h, pad_h), (heads, out_w, pad_w)
    attention = rows[:, :, None, :, None] * cols[:, None, :, None, :]
    return attention.reshape(heads, out_h * out_w, pad_h * pad_w)
