"""Test helpers for the layers' compiled CPU kernels: the built extension, and its calls counted."""

from __future__ import annotations

import shutil
import warnings
from types import ModuleType, SimpleNamespace

import pytest


def built(kernel: ModuleType, monkeypatch) -> ModuleType:
    """The extension of ``kernel`` (a module with ``SETTING`` and ``_module``), enabled on any processor;
    skips the test where it cannot be built (the build is cached)."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build the kernel")
    monkeypatch.setenv(kernel.SETTING, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a failed build warns; here it skips
        extension = kernel._module()
    if extension is None:
        pytest.skip("the kernel could not be built here")
    return extension


def counting(kernel: ModuleType, extension: ModuleType, names: tuple[str, ...], monkeypatch) -> list[str]:
    """Routes ``kernel``'s calls of the extension's functions ``names`` through a counter: the list of names called."""
    counted: list[str] = []

    def counter(name):
        def call(*args):
            counted.append(name)
            return getattr(extension, name)(*args)

        return call

    monkeypatch.setattr(kernel, "_module", lambda: SimpleNamespace(**{name: counter(name) for name in names}))
    return counted
