"""The compiled CPU kernel for a layer's output projection in inference, built on first use.

``ConvAttention2d`` projects every head's gathered channels with its
convolution's weight: the convolution's own arithmetic on the taps the heads
gathered, ``(B, C, heads, queries)``, nine times the convolution's input for
a 3x3 kernel.  The layer runs that as a strided convolution because oneDNN,
PyTorch's CPU convolution, then sums every output in the convolution's own
order, so the layer equals its convolution to the last bit at
initialisation.  But oneDNN first copies the taps into its blocked layout,
on every call (a quarter of the projection's time and more in a CIFAR
ResNet's layer at batch 128), and PyTorch cannot hand it tensors already in
that layout.

``csrc/project_taps.cpp`` computes the projection from the taps where they
lie, adding the products in the order of oneDNN's direct convolution on
AVX2: each output starts at its bias, then one fused multiply-add per
product, input channels in blocks of 8, kernel taps outer and channels
inner within a block (``reduction_order``).  That is the order in which
oneDNN sums the strided convolution too wherever it runs it as a direct
convolution, but not where it falls back to a matrix product (grouped
convolutions whose channels do not fill its blocks, padding as wide as the
kernel, ...) or where PyTorch convolves without oneDNN (small batch-1
inputs, oneDNN disabled), and which applies depends on oneDNN's version and
the processor.  So a layer does not predict it: the first time it projects
taps of a new ``signature``, it computes both, returns the convolution's,
and uses the kernel for that signature from then on only if the two agreed
bit for bit (taps or weights all zeros settle nothing).  The layer's results are therefore those of the strided
convolution, to the last bit, in every case.

Built by ``cpp_kernels.build`` on first use (about 30 s once, cached), on
PyTorch's thread pool.  By default it is used where PyTorch dispatches to
AVX2, where it was measured (docs/results/conv_attention_speed.md);
``TCNN_FX_NATIVE_PROJECTION=1`` uses it on any processor (with oneDNN's
16-channel blocks on AVX-512: unmeasured), ``0`` never; unset,
``TCNN_FX_NATIVE=0`` turns it off too.  Inference only (float32, no
autograd, nothing captured): training projects with a matrix product
(``attention_backward.ProjectProduct``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tcnn_fx.layers import cpp_kernels, native, workspace

#: Environment variable: ``1`` uses the kernel on any processor, ``0`` never; unset (or ``auto``), at the
#: ``DEFAULT_CAPABILITIES`` unless ``TCNN_FX_NATIVE=0``.
SETTING = "TCNN_FX_NATIVE_PROJECTION"
#: The SIMD levels the kernel is used at by default (where it was measured faster than the convolution).
DEFAULT_CAPABILITIES = ("AVX2",)
KERNEL = "project_taps"
#: Output channels per register tile of the kernel: the packed weights come in blocks of this many.
ROWS = 6
#: Output pixels per panel row of the kernel, and panels per task at most: the size of each thread's scratch.
COLUMNS = 16
PANELS = 4
#: Input channels per block of oneDNN's direct convolution at a SIMD level (its vector width); 8 elsewhere.
CHANNEL_BLOCKS = {"AVX512": 16}


class Operands(NamedTuple):
    """A layer's weights in the kernel's reduction order: ``packed`` ``(groups, blocks, K, ROWS)`` and, per
    reduction step, the input channel within its group and the tap: ``channels``, ``taps`` ``(K,)``."""

    packed: Tensor
    channels: Tensor
    taps: Tensor


def enabled() -> bool:
    """Whether the layers may use the kernel (see the module docstring for the settings)."""
    return cpp_kernels.enabled(SETTING, DEFAULT_CAPABILITIES, off_with=native.SETTING)


def _module():
    """The built extension module, or ``None`` (warned once) when it cannot be built or loaded here."""
    return cpp_kernels.build(KERNEL, SETTING, "ConvAttention2d projects with a strided convolution instead (slower)")


def reduction_order(channels: int, taps: int, block: int) -> tuple[Tensor, Tensor]:
    """The (channel, tap) pairs of one output's sum in oneDNN's order: blocks of ``block`` channels, taps outer."""
    order = [
        (channel, tap)
        for start in range(0, channels, block)
        for tap in range(taps)
        for channel in range(start, min(start + block, channels))
    ]
    return tuple(torch.tensor(column, dtype=torch.int64) for column in zip(*order))


def operands(weight: Tensor, groups: int) -> Operands:
    """``weight`` ``(O, C / groups, kh, kw)`` packed for the kernel: row blocks of ``ROWS`` outputs per group,
    each a ``(K, ROWS)`` matrix in reduction order (rows past a group's outputs are zeros)."""
    out_channels, per_group_in = weight.shape[:2]
    per_group = out_channels // groups
    channels, taps = reduction_order(per_group_in, weight.shape[2] * weight.shape[3], _channel_block())
    ordered = weight.detach().float().flatten(2)[:, channels, taps]  # (O, K)
    blocks = -(-per_group // ROWS)
    padded = ordered.new_zeros(groups, blocks * ROWS, ordered.shape[1])
    padded[:, :per_group] = ordered.reshape(groups, per_group, -1)
    packed = padded.reshape(groups, blocks, ROWS, -1).transpose(2, 3).contiguous()
    return Operands(packed, channels, taps)


def _channel_block() -> int:
    """oneDNN's input-channel block at the SIMD level PyTorch dispatches to."""
    return CHANNEL_BLOCKS.get(torch.backends.cpu.get_cpu_capability(), 8)


def usable(taps: Tensor) -> bool:
    """Whether ``project`` can run on these taps: enabled, float32 inference on plain CPU tensors, and built."""
    return (  # not captured first: nothing below may run under torch.compile or export
        workspace.usable(taps)
        and taps.dtype == torch.float32
        and not torch.is_grad_enabled()
        and enabled()
        and _module() is not None
    )


def signature(taps: Tensor) -> tuple:
    """What decides how PyTorch and oneDNN sum a convolution of these taps, hence whether the kernel's order is
    theirs: the shape, PyTorch's thread count (its backend rule reads it) and whether oneDNN is enabled."""
    return (tuple(taps.shape), torch.get_num_threads(), torch.backends.mkldnn.enabled)


def project(taps: Tensor, ops: Operands, bias: Tensor | None, out_channels: int) -> Tensor:
    """``out[b, o, q] = bias[o] + sum_{c, h} w[o, c, h] taps[b, c, h, q]``, ``(B, O, Q)``, summed in oneDNN's
    order, where ``usable`` says it can run.

    ``taps`` ``(B, C, heads, Q)`` may have any strides but a unit one along the pixels (else it is copied);
    ``ops`` from ``operands`` of the layer's weight.
    """
    if taps.stride(-1) != 1:
        taps = taps.contiguous()
    scratch = workspace.empty((torch.get_num_threads() * PANELS * ops.packed.shape[2] * COLUMNS,), taps)
    out = taps.new_empty(taps.shape[0], out_channels, taps.shape[-1])
    bias = taps.new_empty(0) if bias is None else bias.detach()
    _module().project_taps(taps, ops.packed, ops.channels, ops.taps, bias, out, scratch)
    return out
