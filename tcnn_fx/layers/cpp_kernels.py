"""Building the layers' C++ CPU kernels (``csrc/*.cpp``) on first use, and the rule that enables each.

Each kernel is compiled with the machine's C++ compiler through
``torch.utils.cpp_extension`` the first time it is needed (about 30 s, once
per kernel, PyTorch version and SIMD level: the library is cached under
``TORCH_EXTENSIONS_DIR``), for the SIMD level PyTorch itself dispatches to,
and runs on PyTorch's own thread pool.  The kernels include only the ATen
and binding headers they use (``csrc/binding.h``): ``torch/extension.h``
made each build take twice as long.  Without a compiler, or where the
build or the load fails, ``build`` warns once per kernel and answers
``None``; the callers then compose PyTorch operators, which compute the
same function.

Which processors use a kernel by default is the kernel's own measured
answer (its module's ``DEFAULT_CAPABILITIES``); an environment variable per
kernel overrides it: ``1`` on any processor, ``0`` never (no build); left
unset, a kernel may also follow a setting for several (``off_with``).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES = Path(__file__).with_name("csrc")
#: Compiler flags for the SIMD levels ``torch.backends.cpu.get_cpu_capability()`` reports; others build portable code.
SIMD_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
BUILD_ERRORS = (RuntimeError, OSError, ImportError, subprocess.CalledProcessError)

log = logging.getLogger(__name__)


def enabled(setting: str, capabilities: tuple[str, ...], off_with: str | None = None) -> bool:
    """Whether a kernel may be used: its ``setting`` is ``1``, or unset (``auto``) at one of its ``capabilities``
    unless the setting ``off_with`` (one that turns a family of kernels off) is ``0``."""
    value = os.environ.get(setting, "auto")
    if value == "auto":
        if off_with is not None and os.environ.get(off_with) == "0":
            return False
        return torch.backends.cpu.get_cpu_capability() in capabilities
    return value != "0"


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
def build(kernel: str, setting: str, fallback: str) -> ModuleType | None:
    """The extension module built from ``csrc/{kernel}.cpp``, or ``None`` (warned once) where it cannot be built.

    ``setting`` (the kernel's environment variable) and ``fallback`` (what
    runs instead) only word the warning.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    version = torch.__version__.split("+")[0].replace(".", "_")
    name = f"tcnn_fx_{kernel}_{capability.lower()}_torch{version}"
    source = SOURCES / f"{kernel}.cpp"
    log.info("loading %s, built from %s on first use (cached under TORCH_EXTENSIONS_DIR)", name, source)
    try:
        return _cpp_extension().load(
            name=name, sources=[str(source)], extra_cflags=["-O3", "-fopenmp", *SIMD_FLAGS.get(capability, [])]
        )
    except BUILD_ERRORS as error:
        warnings.warn(
            f"tcnn_fx could not build its CPU attention kernel {kernel} ({type(error).__name__}: {error}); "
            f"{fallback}. It needs a C++ compiler with OpenMP and ninja; set {setting}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
