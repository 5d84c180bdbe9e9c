"""ONNX export with torch's dynamo exporter, and verification with ONNX Runtime.

``to_onnx`` chooses each attention layer's graph (``lowering``), captures
the model with ``torch.export`` (batch, height and width symbolic by
default), translates it to ONNX and runs onnxscript's optimiser, which folds
what does not depend on the input into constants.  The file is written atomically: a failed export leaves nothing at
``path``.  ``verify_onnx`` runs the file with ONNX Runtime and compares with
PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from tcnn_fx import meta
from tcnn_fx.errors import (
    InvalidInputError,
    MissingDependencyError,
    MissingFileError,
    TcnnFxError,
    UnwritablePathError,
    VerificationError,
)
from tcnn_fx.export.lowering import Lowering, lowered, plan
from tcnn_fx.files import atomic_write
from tcnn_fx.modes import evaluating
from tcnn_fx.verify import Comparison, compare

SUPPORTED_OPSETS = range(18, 24)


class ExportError(TcnnFxError, RuntimeError):
    """The model cannot be exported; the message says why, from the exporter."""


def _metadata(model: nn.Module, opset: int) -> dict[str, str]:
    """The file's metadata: the tcnn_fx version and opset, and for a hybrid its rewrite recipe and converted sites."""
    from tcnn_fx import __version__

    data = {"tcnn_fx_version": __version__, "opset": str(opset)}
    try:
        _, graph = meta.rewritten_graph(model)
    except InvalidInputError:  # a plain CNN
        return data
    recipe = meta.recipe(graph)
    data["base_model"] = recipe.spec or ""
    data["policy"] = json.dumps(recipe.policy)
    data["recipe"] = json.dumps(recipe.to_dict())
    data["converted_sites"] = json.dumps(list(meta.report(graph).converted))
    return data


def _capture(model: nn.Module, example_inputs: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict, as the ONNX exporter captures): its guards say what the code assumes of sizes."""
    try:
        return torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:
        raise ExportError(f"cannot export {type(model).__name__} to ONNX: {_one_line(error)}") from error


def _translate(program: torch.export.ExportedProgram, name: str, opset: int, optimize: bool):
    try:
        return torch.onnx.export(
            program, dynamo=True, opset_version=opset, optimize=optimize, external_data=False, verbose=False
        )
    except Exception as error:
        raise ExportError(f"cannot export {name} to ONNX: {_one_line(error)}") from error


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    dynamic_resolution: bool = True,
    lowering: Lowering | None = None,
    optimize: bool = True,
    fp16: bool = False,
    ort_fusions: bool = False,
) -> Path:
    """Export ``model`` (in eval mode) to ``path`` as ONNX; returns the path.

    ``dynamic_batch`` makes the first dimension of every input symbolic, so
    one file serves any batch size, whatever the example's (a batch of one
    is traced as two: the exporter would otherwise fix it).
    ``dynamic_resolution`` makes the dimensions after the channels symbolic
    too (height and width of images): the positional maps are then computed
    in the graph from the runtime shape, so one file serves every size the
    model accepts; a model whose code cannot run on symbolic sizes is exported
    at the example's size, with a warning that says why.  What the model's code assumes of the sizes (torch.export's
    guards) is recorded in the metadata (``size_conditions``); one that pins
    the sizes (it fails when the example's height and width grow by one or
    double: a flattened map's length) is a warning: the file is right only
    at sizes that satisfy it.  ``dynamic_resolution=False`` fixes them to the
    example's, and the maps are folded into constants.

    ``lowering`` (``tcnn_fx.export.lowering.Lowering``) says how each
    attention layer is written: its positional branch as a ``Conv`` where
    the maps are one-hot, its content branch skipped where every content
    weight is zero, else as ``MatMul-Softmax-MatMul`` or the ``Attention`` op
    (opset >= 23), chosen per layer by a cost model for its ``target``.
    The choices are recorded in the file's metadata (``lowering``).

    ``fp16`` exports a half-precision copy (weights, activations, inputs and
    outputs; the positional maps are computed in float32, and the content
    softmax runs in float32).  ``ort_fusions`` applies onnxscript's ONNX
    Runtime fusions and records how many fired.  The model's rewrite report,
    if any, is recorded in the file's metadata (tcnn_fx version, base model,
    policy, opset), as are the symbolic dimensions (``dynamic_axes``).
    """
    if opset not in SUPPORTED_OPSETS:
        raise InvalidInputError(f"opset {opset} is not supported; use one of {list(SUPPORTED_OPSETS)}")
    lowering = lowering if lowering is not None else Lowering()
    lowering.check_opset(opset)
    path = Path(path)
    if not path.parent.is_dir():
        raise MissingFileError(f"cannot write {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise UnwritablePathError(f"cannot write {path}: directory {path.parent} is not writable")
    metadata = _metadata(model, opset) | {"fp16": str(fp16).lower()}
    choices = plan(model, example_inputs, lowering, opset)
    metadata["lowering"] = json.dumps({"options": lowering.to_dict()} | {n: c.to_dict() for n, c in choices.items()})
    model = lowered(model, choices)  # a copy
    if fp16:
        model = model.half()
        example_inputs = tuple(x.half() if x.is_floating_point() else x for x in example_inputs)
    if dynamic_batch:
        # torch.export specialises a dimension of size 1 (and fixed the file to batch 1): trace at batch 2.
        example_inputs = tuple(_at_least_two(x) for x in example_inputs)
    with evaluating(model):
        try:
            captured = _capture(model, example_inputs, _dynamic_shapes(example_inputs, dynamic_batch, dynamic_resolution))
        except ExportError as error:
            if not dynamic_resolution:
                raise
            # Code that cannot run on a symbolic height or width (a size turned into a Python int, a
            # data-dependent branch on it) still exports at the example's size.
            captured = _capture(model, example_inputs, _dynamic_shapes(example_inputs, dynamic_batch, False))
            dynamic_resolution = False
            warnings.warn(
                f"{type(model).__name__} exports with a fixed height and width only (those of the example, "
                f"{[tuple(x.shape[2:]) for x in example_inputs]}): with them symbolic, {error}",
                UserWarning,
                stacklevel=2,
            )
    onnx_model = _translate(captured, type(model).__name__, opset, optimize).model
    _name_dimensions(onnx_model, captured)
    axes = _symbolic_axes(onnx_model)
    conditions = _size_conditions(captured)
    metadata["dynamic_axes"] = json.dumps(axes)
    metadata["size_conditions"] = json.dumps(conditions)
    if dynamic_resolution:
        _warn_tied(conditions, captured, example_inputs)
    if ort_fusions:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        onnx_model, counts = optimize_for_ort(onnx_model)
        metadata["ort_fusions"] = json.dumps({name: n for name, n in counts.items() if n})
    onnx_model.metadata_props.update(metadata)
    with atomic_write(path) as temporary:
        ir.save(onnx_model, temporary)
    return path


def _dynamic_shapes(example_inputs: tuple, batch: bool, resolution: bool):
    """``torch.export``'s dynamic shapes: the batch named, the dimensions after the channels left to export
    (``Dim.AUTO``: symbolic unless the model's code needs one size)."""
    if not (batch or resolution):
        return None
    shapes = []
    for x in example_inputs:
        dims = {0: torch.export.Dim("batch")} if batch and x.dim() else {}
        if resolution:
            dims |= {axis: torch.export.Dim.AUTO for axis in range(2, x.dim())}
        shapes.append(dims)
    return tuple(shapes)


def _name_dimensions(onnx_model, captured: torch.export.ExportedProgram) -> None:
    """Name the graph's symbolic dimensions after the inputs' axes (``batch``, ``height``, ``width``; prefixed
    by the input's name where there are several), in place of the exporter's ``s77``-style symbols."""
    inputs = [n for n in captured.graph.nodes if n.op == "placeholder" and n.name in captured.graph_signature.user_inputs]
    names = {}
    for node in inputs:
        prefix = f"{node.name}_" if len(inputs) > 1 else ""
        shape = node.meta["val"].shape
        axis_names = {0: "batch"} | ({2: "height", 3: "width"} if len(shape) == 4 else {})
        for axis, size in enumerate(shape):
            if isinstance(size, torch.SymInt):
                names.setdefault(str(size), prefix + axis_names.get(axis, f"dim{axis}"))
    values = list(onnx_model.graph.inputs) + list(onnx_model.graph.outputs)
    values += [v for node in ir.traversal.RecursiveGraphIterator(onnx_model.graph) for v in node.outputs]
    for value in values:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in names for d in value.shape):
            value.shape = ir.Shape(
                [ir.SymbolicDim(names.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d for d in value.shape]
            )


def _symbolic_axes(onnx_model) -> dict[str, dict[str, str]]:
    """Each graph input's symbolic dimensions, by axis: ``{'x': {'0': 'batch', '2': 's53', ...}}``."""
    return {
        value.name: {str(axis): str(dim) for axis, dim in enumerate(value.shape) if not isinstance(dim, int)}
        for value in onnx_model.graph.inputs
    }


def _size_conditions(captured: torch.export.ExportedProgram) -> list[str]:
    """What the model's code assumes of the symbolic sizes, as ``torch.export`` recorded it (its guards).

    The file computes the model's function where these hold (a branch taken
    on a size, a flattened map's length); ONNX Runtime does not check them.
    Empty where this torch records none (``_guards_code`` is not public API).
    """
    return list(getattr(captured, "_guards_code", None) or [])


class _Shape:
    """An input as a guard reads it (``L['x'].size()[2]``): its shape only."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = torch.Size(shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]


def _holds(condition: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether one of torch.export's guards (Python over ``L[name].size()``) holds for inputs of ``shapes``.

    The guards are code torch generated from the model's own forward (sizes,
    arithmetic, ``torch.sym_min`` ...); one it cannot evaluate counts as
    not holding.
    """
    try:
        return bool(eval(condition, {"__builtins__": {}, "torch": torch}, {"L": {n: _Shape(s) for n, s in shapes.items()}}))
    except Exception:  # noqa: BLE001 (an unreadable guard is reported, not trusted)
        return False


def _warn_tied(conditions: list[str], captured: torch.export.ExportedProgram, example_inputs: tuple) -> None:
    """Warn about every guard that pins the input sizes: one that fails at the example's sizes grown by one pixel
    or doubled, after the channels (an equation such as a flattened map's length; ``H * W == W * H`` is not)."""
    names = list(captured.graph_signature.user_inputs)
    probes = [
        {n: tuple(d if axis < 2 else grow(d) for axis, d in enumerate(x.shape)) for n, x in zip(names, example_inputs)}
        for grow in (lambda d: d + 1, lambda d: 2 * d)
    ]
    pinned = [c for c in conditions if not all(_holds(c, shapes) for shapes in probes)]
    if pinned:
        warnings.warn(
            f"the model's code ties its input sizes to {pinned} (torch.export's guards): the ONNX file computes "
            "the model only at sizes that satisfy them (all guards are in its metadata, size_conditions); pass "
            "dynamic_resolution=False to fix the size to the example's",
            UserWarning,
            stacklevel=3,
        )


def _at_least_two(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a batch of at least two: a batch of one is repeated (the exported graph does not depend on it)."""
    return torch.cat([x, x]) if x.dim() and x.shape[0] == 1 else x


@dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime against PyTorch on one provider: per-output comparisons."""

    provider: str
    outputs: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.outputs)

    def table(self) -> str:
        lines = [f"{self.provider}: {'passed' if self.passed else 'FAILED'}"]
        lines += [f"  {c.name}: max abs {c.max_abs:.3e}, max rel {c.max_rel:.3e}" for c in self.outputs]
        return "\n".join(lines)


#: ONNX Runtime's log severities by name: its own warnings (e.g. that it cannot constant-fold a float16
#: ``Mul`` on the CPU, once per node) are shown only when asked for.
LOG_LEVELS = {"verbose": 0, "info": 1, "warning": 2, "error": 3, "fatal": 4}


#: How ONNX Runtime says that it lacks an op, a kernel for it on the provider, or the file's format version.
RUNTIME_GAPS = ("is not a registered function/op", "No Op registered", "Could not find an implementation",
                "Unsupported model IR version")  # fmt: skip


def _session(path: Path, provider: str, *, spinning: bool = True, log_level: str = "error"):
    """An ONNX Runtime session on exactly ``provider``, logging at ``log_level`` and above.

    ``spinning=False`` stops idle worker threads from spinning, so that they
    do not slow down other code timed between runs.
    """
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from error
    available = ort.get_available_providers()
    if provider not in available:
        raise MissingDependencyError(f"ONNX Runtime provider {provider} is not available; available: {available}")
    if log_level not in LOG_LEVELS:
        raise InvalidInputError(f"ONNX Runtime log level {log_level!r} is not one of {list(LOG_LEVELS)}")
    options = ort.SessionOptions()
    options.log_severity_level = LOG_LEVELS[log_level]
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    settings = {"use_tf32": "0"} if provider == "CUDAExecutionProvider" else {}  # exact float32 products
    if not path.is_file():
        raise MissingFileError(f"ONNX file {path} does not exist")
    try:
        session = ort.InferenceSession(str(path), options, providers=[(provider, settings)])
    except Exception as error:
        if any(sign in str(error) for sign in RUNTIME_GAPS):
            raise MissingDependencyError(
                f"ONNX Runtime {ort.__version__} cannot run {path} on {provider}: {_one_line(error)}; export with "
                "what it supports (opset 18, lowering content='matmul') or install a newer onnxruntime"
            ) from error
        raise InvalidInputError(f"ONNX Runtime cannot load {path}: {_one_line(error)}") from error
    if session.get_providers()[0] != provider:
        raise MissingDependencyError(
            f"ONNX Runtime could not use {provider} on this machine (it fell back to {session.get_providers()[0]})"
        )
    return session


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:400] or type(error).__name__


def _top1(comparison: Comparison, actual: torch.Tensor, expected: torch.Tensor, required: bool) -> Comparison:
    """A half-precision file must also agree on the predicted class of every row of 2-d logits."""
    if not required or actual.dim() != 2:
        return comparison
    agree = bool((actual.argmax(1) == expected.cpu().argmax(1)).all())
    return dataclasses.replace(
        comparison,
        passed=comparison.passed and agree,
        name=f"{comparison.name} (top-1 {'agrees' if agree else 'DIFFERS'})",
    )


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: tuple,
    *,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    rtol: float | None = None,
    atol: float = 0.0,
    log_level: str = "error",
) -> list[OnnxCheck]:
    """Run ``path`` with ONNX Runtime on each provider and compare with ``model`` in eval mode.

    Inputs are cast to the file's input types.  ``rtol`` defaults to 1e-5 for
    a float32 file on the CPU provider, 1e-4 on GPU providers (CUDA runs with
    TF32 off), and 1e-2 for a float16 file, which must also give the same
    top-1 class on 2-d outputs (logits).  Raises an error with the
    per-output table when an output's relative error exceeds ``rtol`` (and its
    absolute error ``atol``): a ``VerificationError`` (an ``AssertionError``).
    A file ONNX Runtime cannot load or run on ``inputs`` is an
    ``InvalidInputError`` naming it.  ``log_level`` (``'verbose'``, ``'info'``,
    ``'warning'``, ``'error'``, ``'fatal'``) is what ONNX Runtime itself prints.
    """
    with evaluating(model), torch.no_grad():
        expected = model(*inputs)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    checks = []
    for provider in providers:
        session = _session(Path(path), provider, log_level=log_level)
        half = any(i.type == "tensor(float16)" for i in session.get_inputs())
        default = 1e-2 if half else (1e-5 if provider == "CPUExecutionProvider" else 1e-4)
        tolerance = rtol if rtol is not None else default
        feeds = {
            i.name: (x.half() if i.type == "tensor(float16)" else x).detach().cpu().numpy()
            for i, x in zip(session.get_inputs(), inputs)
        }
        if len(feeds) != len(inputs) or len(session.get_inputs()) != len(inputs):
            raise InvalidInputError(
                f"{path} takes {len(session.get_inputs())} inputs; {len(inputs)} were given: is it another model's file?"
            )
        try:
            results = session.run(None, feeds)
        except Exception as error:
            raise InvalidInputError(
                f"{path} does not run on inputs of shapes {[tuple(x.shape) for x in inputs]}: {_one_line(error)}"
            ) from error
        actual = [torch.from_numpy(np.asarray(a)).float() for a in results]
        if len(actual) != len(expected):
            raise InvalidInputError(f"{path} has {len(actual)} outputs, the model {len(expected)}: another model's file?")
        shapes = [(tuple(a.shape), tuple(e.shape)) for a, e in zip(actual, expected)]
        if any(a != e for a, e in shapes):
            raise InvalidInputError(f"{path} gives outputs of shapes {[a for a, _ in shapes]}, the model "
                                    f"{[e for _, e in shapes]}: another model's file?")  # fmt: skip
        outputs = tuple(
            _top1(compare(f"output {i}", a, e.float().cpu(), tolerance, atol), a, e, half)
            for i, (a, e) in enumerate(zip(actual, expected))
        )
        checks.append(OnnxCheck(provider, outputs))
    failed = [c for c in checks if not c.passed]
    if failed:
        raise VerificationError("ONNX Runtime disagrees with PyTorch:\n" + "\n".join(c.table() for c in failed))
    return checks
