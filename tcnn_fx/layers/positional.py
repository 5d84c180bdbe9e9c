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


def relative_offsets(
    geometry: ConvGeometry, height: int, width: int, *, image_keys: bool = False, device=None, dtype=torch.float32
) -> Tensor:
    """Offsets from every query to every key, shape ``(queries, keys, 2)``, keys as in ``positional_attention``.

    Used to measure attention distances; the attention itself never
    materialises this tensor.
    """
    out_h, out_w = geometry.output_size(height, width)
    pad_h, pad_w = geometry.padded_size(height, width)
    rows = _axis_offsets(geometry, 0, out_h, pad_h, device, dtype)
    cols = _axis_offsets(geometry, 1, out_w, pad_w, device, dtype)
    if image_keys:
        top, _, left, _ = geometry.padding
        rows, cols = rows[:, top : top + height], cols[:, left : left + width]
    grid = torch.stack(torch.broadcast_tensors(rows[:, None, :, None], cols[None, :, None, :]), dim=-1)
    return grid.reshape(out_h * out_w, rows.shape[-1] * cols.shape[-1], 2)


def positional_attention(
    geometry: ConvGeometry, centres: Tensor, locality: Tensor, height: int, width: int, *, image_keys: bool = False
) -> Tensor:
    """Attention of every head from every output pixel to every padded-grid pixel.

    ``centres`` is ``(heads, 2)`` (row, column offsets from the query),
    ``locality`` is ``(heads,)``.  Returns ``(heads, out_h * out_w, keys)`` in
    the dtype of ``centres``.  The softmax always runs over the padded grid;
    with ``image_keys`` the padding's columns are then dropped (``keys =
    height * width``), which is exact for zero padding, whose pixels carry no
    value: rows near the border then sum to less than one, as a zero-padded
    convolution's taps do.
    """
    out_h, out_w = geometry.output_size(height, width)
    pad_h, pad_w = geometry.padded_size(height, width)
    top, _, left, _ = geometry.padding
    heads = centres.shape[0]
    factors = []
    for axis, (out_len, padded_len, in_len, start) in enumerate(
        ((out_h, pad_h, height, top), (out_w, pad_w, width, left))
    ):
        offsets = _axis_offsets(geometry, axis, out_len, padded_len, centres.device, centres.dtype)
        scores = -locality[:, None, None] * (offsets.unsqueeze(0) - centres[:, axis, None, None]).square()
        factor = scores.softmax(dim=-1)
        factors.append(factor[..., start : start + in_len] if image_keys else factor)
    rows, cols = factors  # (heads, out_h, key rows), (heads, out_w, key columns)
    attention = rows[:, :, None, :, None] * cols[:, None, :, None, :]
    return attention.reshape(heads, out_h * out_w, rows.shape[-1] * cols.shape[-1])
