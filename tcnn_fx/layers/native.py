"""The compiled CPU kernel behind ``ConvAttention2d`` inference, built on first use.

PyTorch has no operator for the layer's gated attention; composed from its
operators, every attention map is written to memory, softmaxed, mixed with the
positional map and read back by the gather, and on the CPU that traffic (plus
MKL's matrix products, which skip AVX-512 on AMD processors) costs as much as
the layer's arithmetic at 14x14.  ``csrc/attend_gather.cpp`` computes scores,
softmax, mix and gather in one pass per block of queries, the maps never
leaving the cache.

It is compiled by ``cpp_kernels.build`` (the machine's C++ compiler through
``torch.utils.cpp_extension``) the first time a layer runs CPU inference
(about 30 s, once: the library is cached under ``TORCH_EXTENSIONS_DIR``), for
the SIMD level PyTorch itself dispatches to, and runs on PyTorch's own thread
pool.
By default it is used where PyTorch dispatches to AVX-512, the SIMD level it
was written and measured for; built for AVX2 it measured several times slower
than the composed operators (docs/results/conv_attention_speed.md), so other
processors compose PyTorch operators.  ``TCNN_FX_NATIVE=1`` uses it on any
processor, ``0`` never.  Without a compiler, or where the build or the load
fails (one warning says why), layers compose PyTorch operators instead: the
same results to float32 rounding.

The kernel is registered with PyTorch as the operator
``tcnn_fx::attend_gather`` (``torch.library.custom_op``) with a fake
implementation that states its output's shape, so ``torch.compile`` puts
it in its graph as one opaque call rather than breaking the graph at a
pybind function.  Registering costs nothing: the build still happens on
the operator's first real call.  The operator has no autograd formula (it
serves inference only) and no ONNX translation, which is why exported
graphs never contain it (``backends.choose``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tcnn_fx.errors import MissingDependencyError
from tcnn_fx.layers import cpp_kernels

#: Environment variable: ``0`` keeps every layer on PyTorch operators (no build); ``1`` uses the kernel on any
#: processor; unset (or ``auto``), only where PyTorch dispatches to AVX-512.
SETTING = "TCNN_FX_NATIVE"
#: The SIMD levels the kernel is used at by default (where it was measured faster than PyTorch's operators).
DEFAULT_CAPABILITIES = ("AVX512",)
#: Queries per block of the kernel: its positional operand is zero-padded to a multiple of this many queries.
QUERY_BLOCK = 48


def enabled() -> bool:
    """Whether layers may use the compiled kernel: ``TCNN_FX_NATIVE=1``, or unset on an AVX-512 processor."""
    return cpp_kernels.enabled(SETTING, DEFAULT_CAPABILITIES)


def _module():
    """The built extension module, or ``None`` (warned once) when it cannot be built or loaded here."""
    return cpp_kernels.build(
        "attend_gather", SETTING, "ConvAttention2d inference composes PyTorch operators instead (slower)"
    )


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether layers use the kernel here: enabled, and built (the first call builds it, warning if it cannot).

    ``torch.compile`` evaluates this once, while tracing, and keeps the answer
    in the compiled code: changing ``TCNN_FX_NATIVE`` later does not change
    what an already compiled model runs.
    """
    return enabled() and _module() is not None


def attend_gather() -> Callable | None:
    """The kernel as the operator ``torch.ops.tcnn_fx.attend_gather``, or ``None`` where it is disabled or unavailable.

    ``attend_gather(q, k, values, base_t, weight, heads)``: ``q`` ``(B, heads * d, Q)``
    and ``k`` ``(B, heads * d, K)`` with any strides, queries scaled by
    ``log2(e) / sqrt(d)``; ``values`` ``(B, C, K)``;
    ``base_t`` ``(heads, K, Qpad)``: each head's positional map times
    ``1 - weight``, transposed, zero-padded to a multiple of ``QUERY_BLOCK`` queries;
    ``weight`` ``(heads,)``, the content weights.  Returns ``(C, B * heads, Q)``,
    float32 CPU tensors throughout.
    """
    return torch.ops.tcnn_fx.attend_gather.default if available() else None


def kernel_operands(positional: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's ``base_t`` and ``weight`` from positional maps ``(heads, Q, K)`` and content weights ``(heads,)``."""
    base = positional * (1 - weight)[:, None, None]
    return F.pad(base.transpose(1, 2), (0, -base.shape[1] % QUERY_BLOCK)).contiguous(), weight.contiguous()


@torch.library.custom_op("tcnn_fx::attend_gather", mutates_args=(), device_types="cpu")
def _attend_gather(q: Tensor, k: Tensor, values: Tensor, base_t: Tensor, weight: Tensor, heads: int) -> Tensor:
    """The operator's implementation: the built kernel, on operands in the layouts it reads."""
    module = _module()
    if module is None:
        raise MissingDependencyError(
            f"tcnn_fx::attend_gather was called but its kernel could not be built (see the warning); "
            f"set {SETTING}=0 to use PyTorch operators"
        )
    # A compiled graph may hand over other strides than eager code does: the kernel needs unit stride along
    # the keys of the values and contiguous positional operand and weights (free when they already are).
    values = values if values.stride(2) == 1 else values.contiguous()
    return module.attend_gather(q, k, values, base_t.contiguous(), weight.contiguous(), heads)


@_attend_gather.register_fake
def _(q: Tensor, k: Tensor, values: Tensor, base_t: Tensor, weight: Tensor, heads: int) -> Tensor:
    return q.new_empty((values.shape[1], q.shape[0] * heads, q.shape[2]))
