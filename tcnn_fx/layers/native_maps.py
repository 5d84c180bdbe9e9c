"""The compiled CPU kernel for the elementwise work over the attention maps, forward and backward, built on first use.

A layer's attention maps are ``(batch, heads, queries, keys)``; between the
matrix products, everything done to them is elementwise and bound by memory
traffic, and PyTorch's operators walk the maps once per operator.
``csrc/attend_maps.cpp`` does each direction's share in one pass:

* forward (``content_mix``, float32): the content scores ``S = q^T k``,
  their softmax ``A`` and the mix ``M = (1 - w) P + w A``, one map row at a
  time in the cache, ``M`` (and ``A`` where a backward keeps it) written
  once.  Composed, the scores, softmax and mix each walk the maps in
  memory, and PyTorch's softmax costs as much as its ``exp`` alone; the
  kernel's ``exp`` is a polynomial on the vector lanes (relative error
  about 1e-7, float32 rounding);
* forward with the gather (``content_mix_gather``, float32, from
  ``GATHER_MIN_KEYS`` keys; inference, and training, which keeps ``A``):
  the same maps applied to the values as they are made, 16 rows at a time
  transposed in the cache and swept by the channels in registers, so the
  mixed maps are never written and no batched product reads them back;
* backward (``map_gradients``, float32 and float64): from ``dM``, the
  gradient of the mixed maps, the softmax backward ``dS = A (dM - r)``
  (``r`` the rows' ``sum_k dM * A``), the batch sum of ``dM`` (for the
  positional maps' gradient) and two reductions for the content weights'
  gradient: composed, four operators and eight reads and writes of the
  maps; here ``dM`` and ``A`` are read once and ``dS`` written over ``dM``.

Built by ``cpp_kernels.build`` on the first call that uses it (about 30 s
once, cached), on PyTorch's thread pool.  By default it is used where
PyTorch dispatches to AVX2, where it was measured faster (docs/results);
AVX-512 has not been measured, so those processors keep PyTorch's operators
(and, in inference, the attention-and-gather kernel of ``native``) unless
asked.  ``TCNN_FX_NATIVE_MAPS=1`` uses it on any processor, ``0`` never;
unset, ``TCNN_FX_NATIVE=0`` (no compiled kernels) turns it off too.  Where it
is not used, not built (one warning) or handed tensors it cannot read
directly (``torch.func`` wrappers, fake or other tensor subclasses, a
backward recorded for a second derivative, anything captured into a graph),
the layer composes PyTorch operators: the same function to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tcnn_fx.layers import cpp_kernels, native, workspace
from tcnn_fx.layers.backends import capturing

#: Environment variable: ``1`` uses the kernel on any processor, ``0`` never; unset (or ``auto``), at the
#: ``DEFAULT_CAPABILITIES`` unless ``TCNN_FX_NATIVE=0``.
SETTING = "TCNN_FX_NATIVE_MAPS"
#: The SIMD levels the kernel is used at by default (where it was measured faster than PyTorch's operators).
DEFAULT_CAPABILITIES = ("AVX2",)
KERNEL = "attend_maps"
#: The dtypes of each direction: the forward's exp polynomial is float32's.
FORWARD_DTYPES = (torch.float32,)
BACKWARD_DTYPES = (torch.float32, torch.float64)
#: The fewest keys at which inference gathers inside the kernel (``content_mix_gather``): with 7x7 keys (49) a
#: task's short rows cost more than the batched product they replace (docs/conv_attention.md, "Efficiency").
GATHER_MIN_KEYS = 64


def enabled() -> bool:
    """Whether the layers may use the kernel (see the module docstring for the settings)."""
    return cpp_kernels.enabled(SETTING, DEFAULT_CAPABILITIES, off_with=native.SETTING)


def _module():
    """The built extension module, or ``None`` (warned once) when it cannot be built or loaded here."""
    return cpp_kernels.build(KERNEL, SETTING, "ConvAttention2d composes PyTorch operators instead (slower)")


def _readable(tensors: tuple[Tensor, ...], dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether the kernel can read ``tensors`` directly: plain CPU tensors of one of ``dtypes``, nothing to record."""
    dtype = tensors[0].dtype
    return (
        dtype in dtypes
        and not capturing()
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and all(t.dtype == dtype for t in tensors)
        and workspace.plain_cpu(tensors)
    )


def _usable(tensors: tuple[Tensor, ...], dtypes: tuple[torch.dtype, ...]):
    """The built module where it is enabled and can read ``tensors``, else ``None``."""
    if not (enabled() and _readable(tensors, dtypes)):
        return None
    return _module()


def content_mix(q: Tensor, k: Tensor, base: Tensor, weight: Tensor, *, keep: bool) -> tuple[Tensor, Tensor] | None:
    """The mixed maps ``M`` and, with ``keep``, the content attention ``A``, both ``(B, H, Q, K)`` in recycled memory.

    ``q`` ``(B, H, d, Q)`` (already scaled) and ``k`` ``(B, H, d, K)``,
    each with unit stride along the pixels (other strides are copied);
    ``base`` ``(H, Q, K)``: ``(1 - w) P``; ``weight`` ``(H,)``: ``w``.
    Without ``keep`` the second result is an empty tensor.  ``None`` where
    the kernel is not used: the caller composes operators.
    """
    module = _usable((q, k, base, weight), FORWARD_DTYPES)
    if module is None:
        return None
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    shape = (*q.shape[:2], q.shape[-1], k.shape[-1])
    mixed = workspace.empty(shape, q)
    attention = workspace.empty(shape, q) if keep else q.new_empty(0)
    module.content_mix(q, k, base.contiguous(), weight.contiguous(), mixed, attention)
    return mixed, attention


def content_mix_gather(
    q: Tensor, k: Tensor, base: Tensor, weight: Tensor, values: Tensor, *, keep: bool = False
) -> tuple[Tensor, Tensor] | None:
    """``content_mix``'s maps applied to ``values``, ``(B, C, H, Q)``, and with ``keep`` the content attention
    ``A`` (else an empty tensor), both in recycled memory; the mixed maps are never written.

    ``values`` ``(B, C, K)``; the other operands as ``content_mix``'s.  Each
    task of 16 map rows is transposed in the cache and swept by the value
    channels in registers (``content_mix_gather`` in ``csrc/attend_maps.cpp``),
    in place of writing the maps and a batched matrix product reading them
    back.  ``None`` where the kernel is not used, or where the maps have fewer
    than ``GATHER_MIN_KEYS`` keys: the caller uses ``content_mix`` and a product.
    """
    if k.shape[-1] < GATHER_MIN_KEYS:
        return None
    module = _usable((q, k, base, weight, values), FORWARD_DTYPES)
    if module is None:
        return None
    q, k, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, values))
    out = workspace.empty((values.shape[0], values.shape[1], q.shape[1], q.shape[-1]), q)
    attention = workspace.empty((*q.shape[:2], q.shape[-1], k.shape[-1]), q) if keep else q.new_empty(0)
    module.content_mix_gather(q, k, base.contiguous(), weight.contiguous(), values, out, attention)
    return out, attention


def map_gradients(
    grad_mixed: Tensor, attention: Tensor, positional: Tensor, weight: Tensor, needs: list[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    """``(dS / w, dP, dw)`` as ``attention_backward._map_gradients`` gives them; ``None`` where the kernel is unused.

    ``grad_mixed`` ``(B, H, Q, K)`` (contiguous) is overwritten with
    ``dS / w`` when ``needs[0] or needs[1]``; unneeded results are ``None``.
    """
    if not grad_mixed.is_contiguous():
        return None
    module = _usable((grad_mixed, attention, positional, weight), BACKWARD_DTYPES)
    if module is None:
        return None
    scores = needs[0] or needs[1]
    grad_positional, weight_rows = module.attend_backward(
        grad_mixed, attention.contiguous(), positional.contiguous(), weight.contiguous(), scores, needs[3], needs[4]
    )
    return (
        grad_mixed if scores else None,
        grad_positional if needs[3] else None,
        weight_rows.sum(1) if needs[4] else None,
    )
