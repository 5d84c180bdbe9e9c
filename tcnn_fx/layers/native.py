"""The compiled CPU kernel behind ``ConvAttention2d`` inference, built on first use.

PyTorch has no operator for the layer's gated attention; composed from its
operators, every attention map is written to memory, softmaxed, mixed with the
positional map and read back by the gather, and on the CPU that traffic (plus
MKL's matrix products, which skip AVX-512 on AMD processors) costs as much as
the layer's arithmetic at 14x14.  ``csrc/attend_gather.cpp`` computes scores,
softmax, mix and gather in one pass per block of queries, the maps never
leaving the cache.

It is compiled with the machine's C++ compiler through
``torch.utils.cpp_extension`` the first time a layer runs CPU inference (about
40 s, once: the library is cached under ``TORCH_EXTENSIONS_DIR``), for the SIMD
level PyTorch itself dispatches to, and runs on PyTorch's own thread pool.
By default it is used where PyTorch dispatches to AVX-512, the SIMD level it
was written and measured for; built for AVX2 it measured several times slower
than the composed operators (docs/results/conv_attention_speed.md), so other
processors compose PyTorch operators.  ``TCNN_FX_NATIVE=1`` uses it on any
processor, ``0`` never.  Without a compiler, or where the build or the load
fails (one warning says why), layers compose PyTorch operators instead: the
same results to float32 rounding.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

#: Environment variable: ``0`` keeps every layer on PyTorch operators (no build); ``1`` uses the kernel on any
#: processor; unset (or ``auto``), only where PyTorch dispatches to AVX-512.
SETTING = "TCNN_FX_NATIVE"
#: The SIMD levels the kernel is used at by default (where it was measured faster than PyTorch's operators).
DEFAULT_CAPABILITIES = ("AVX512",)
SOURCE = Path(__file__).with_name("csrc") / "attend_gather.cpp"
#: Compiler flags for the SIMD levels ``torch.backends.cpu.get_cpu_capability()`` reports; others build portable code.
SIMD_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
BUILD_ERRORS = (RuntimeError, OSError, ImportError, subprocess.CalledProcessError)
#: Queries per block of the kernel: its positional operand is zero-padded to a multiple of this many queries.
QUERY_BLOCK = 48

log = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether layers may use the compiled kernel: ``TCNN_FX_NATIVE=1``, or unset on an AVX-512 processor."""
    setting = os.environ.get(SETTING, "auto")
    if setting == "auto":
        return torch.backends.cpu.get_cpu_capability() in DEFAULT_CAPABILITIES
    return setting != "0"


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its warning that a CPU-only machine has no CUDA runtime."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


@functools.cache
def _module():
    """The built extension module, or ``None`` (warned) when it cannot be built or loaded here."""
    capability = torch.backends.cpu.get_cpu_capability()
    version = torch.__version__.split("+")[0].replace(".", "_")
    name = f"tcnn_fx_attend_gather_{capability.lower()}_torch{version}"
    log.info("loading %s, built from %s on first use (cached under TORCH_EXTENSIONS_DIR)", name, SOURCE)
    try:
        return _cpp_extension().load(
            name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp", *SIMD_FLAGS.get(capability, [])]
        )
    except BUILD_ERRORS as error:
        warnings.warn(
            f"tcnn_fx could not build its CPU attention kernel ({type(error).__name__}: {error}); "
            f"ConvAttention2d inference composes PyTorch operators instead (slower). It needs a C++ compiler "
            f"with OpenMP and ninja; set {SETTING}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def attend_gather() -> Callable | None:
    """The kernel, or ``None`` where it is disabled or unavailable.

    ``attend_gather(q, k, values, base_t, weight, heads)``: ``q`` ``(B, heads * d, Q)``
    and ``k`` ``(B, heads * d, K)`` with any strides, queries scaled by
    ``log2(e) / sqrt(d)``; ``values`` ``(B, C, K)`` with unit stride along the keys;
    ``base_t`` ``(heads, K, Qpad)``: each head's positional map times
    ``1 - weight``, transposed, zero-padded to a multiple of ``QUERY_BLOCK`` queries;
    ``weight`` ``(heads,)``, the content weights.  Returns ``(C, B * heads, Q)``,
    float32 CPU tensors throughout.
    """
    if not enabled():
        return None
    module = _module()
    return None if module is None else module.attend_gather
