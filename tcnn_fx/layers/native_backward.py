"""The compiled CPU kernel for the elementwise part of the training backward, built on first use.

``attention_backward._backward`` derives every gradient of the attention
core from ``dM``, the gradient of the mixed maps.  Between its matrix
products it needs the softmax backward ``dS = A (dM - r)`` (``r`` the rows'
``sum_k dM * A``), the batch sum of ``dM`` (for the positional maps'
gradient) and two reductions for the content weights' gradient; composed
from PyTorch operators that is four operators over the ``(batch, heads,
queries, keys)`` maps, eight reads and writes of them, all bound by memory
traffic.  ``csrc/attend_backward.cpp`` does it in one pass (reads ``dM``
and ``A`` once, writes ``dS`` over ``dM``), float32 and float64 alike, on
PyTorch's thread pool.

Built by ``cpp_kernels.build`` on the first backward that uses it (about
40 s once, cached).  By default it is used where PyTorch dispatches to AVX2,
where it was measured faster (docs/results/training_step.md); AVX-512 has
not been measured, so those processors keep PyTorch's operators unless
asked.  ``TCNN_FX_NATIVE_BACKWARD=1`` uses it on any processor, ``0`` never;
unset, ``TCNN_FX_NATIVE=0`` (no compiled kernels) turns it off too.  Where
it is not used, not built (one warning) or handed tensors it cannot read
directly (``torch.func`` wrappers, fake or other tensor subclasses, a
backward recorded for a second derivative), the backward composes PyTorch
operators: the same gradients to float rounding.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from tcnn_fx.layers import cpp_kernels, native, workspace

#: Environment variable: ``1`` uses the kernel on any processor, ``0`` never; unset (or ``auto``), at the
#: ``DEFAULT_CAPABILITIES`` unless ``TCNN_FX_NATIVE=0``.
SETTING = "TCNN_FX_NATIVE_BACKWARD"
#: The SIMD levels the kernel is used at by default (where it was measured faster than PyTorch's operators).
DEFAULT_CAPABILITIES = ("AVX2",)
KERNEL = "attend_backward"
DTYPES = (torch.float32, torch.float64)


def enabled() -> bool:
    """Whether the backward may use the kernel (see the module docstring for the settings)."""
    if os.environ.get(SETTING, "auto") == "auto" and os.environ.get(native.SETTING) == "0":
        return False
    return cpp_kernels.enabled(SETTING, DEFAULT_CAPABILITIES)


def _module():
    """The built extension module, or ``None`` (warned once) when it cannot be built or loaded here."""
    return cpp_kernels.build(KERNEL, SETTING, "ConvAttention2d training composes PyTorch operators instead (slower)")


def _readable(tensors: tuple[Tensor, ...]) -> bool:
    """Whether the kernel can read ``tensors`` directly: plain CPU tensors of one float dtype, nothing to record."""
    dtype = tensors[0].dtype
    return (
        dtype in DTYPES
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and all(t.dtype == dtype for t in tensors)
        and workspace.plain_cpu(tensors)
    )


def map_gradients(
    grad_mixed: Tensor, attention: Tensor, positional: Tensor, weight: Tensor, needs: list[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    """``(dS / w, dP, dw)`` as ``attention_backward._map_gradients`` gives them; ``None`` where the kernel is unused.

    ``grad_mixed`` ``(B, H, Q, K)`` (contiguous) is overwritten with
    ``dS / w`` when ``needs[0] or needs[1]``; unneeded results are ``None``.
    """
    tensors = (grad_mixed, attention, positional, weight)
    if not (enabled() and _readable(tensors) and grad_mixed.is_contiguous()):
        return None
    module = _module()
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
