"""The errors tcnn_fx raises on purpose: every one subclasses ``TcnnFxError``.

A ``TcnnFxError`` is an expected failure caused by what the caller gave (a
model spec, a policy, an option, a file); its message names the culprit and
what would work, and the command line prints it as one line.  Any other
exception is a bug and keeps its traceback.  Each class also subclasses the
builtin the project raised before it existed, so ``except ValueError`` in
callers' code keeps working.
"""

from __future__ import annotations


class TcnnFxError(Exception):
    """Base of every error tcnn_fx raises on purpose."""


class InvalidInputError(TcnnFxError, ValueError):
    """A value the caller gave does not work: an option, a model, a tensor, the contents of a file."""


class UsageError(TcnnFxError, TypeError):
    """Arguments that do not go together, or of the wrong kind."""


class MissingFileError(TcnnFxError, FileNotFoundError):
    """A file or folder the caller named does not exist."""


class FileConflictError(TcnnFxError, FileExistsError):
    """A file or folder would be overwritten without being asked to."""


class UnwritablePathError(TcnnFxError, PermissionError):
    """A file cannot be written where the caller asked."""


class MissingDependencyError(TcnnFxError, RuntimeError):
    """An optional package, runtime provider or operator that the request needs is not available."""


class VerificationError(TcnnFxError, AssertionError):
    """Two models that should agree numerically do not (a rewrite against its original, ONNX against PyTorch)."""


class DivergenceError(TcnnFxError, FloatingPointError):
    """A loss or metric became NaN or infinite."""


class ModelSpecError(InvalidInputError):
    """A model spec (``torchvision:NAME``, ``path/to/file.py:factory`` ...) or weights file that cannot be used."""


class CheckpointError(InvalidInputError):
    """A checkpoint that cannot be loaded as asked: wrong format, damaged, another model's, or untrusted code."""
