"""Capture: trace a model into a ``torch.fx.GraphModule`` that real models survive.

``symbolic_trace`` fails on many real CNNs (data-dependent padding, shape
arithmetic, Python control flow on tensors).  ``capture`` traces with the
leaf-module and auto-wrap registries that timm and torchvision keep for their
own models, and when a submodule still cannot be traced it keeps that
submodule whole (a leaf) and tries again, recording which modules were kept
so and why.  Modules whose traced code differs between train and eval mode
(drop-path, mode-dependent branches) are kept whole too, so that the captured
graph behaves like the model in both modes; a difference that remains is
reported.

Padding helpers of timm's TensorFlow-style 'same' convolutions are wrapped as
single graph nodes, and those convolutions are traced through, so that they
appear as an explicit pad feeding ``F.conv2d``: sites the compiler can convert.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import operator
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from tcnn_fx import meta
from tcnn_fx.errors import InvalidInputError, TcnnFxError, UsageError
from tcnn_fx.layers import ConvAttention2d, ConvStem
from tcnn_fx.modes import restored_modes
from tcnn_fx.stages import declared_stages

#: How many submodules may be made leaves before capture gives up.
MAX_FALLBACKS = 64


class CaptureError(TcnnFxError, RuntimeError):
    """The model cannot be captured; the message names the module and the reason."""


@dataclass(frozen=True)
class CaptureInfo:
    """What ``capture`` had to do to trace the model, stored in ``graph_module.meta['tcnn_fx.capture']``."""

    fallback_leaves: dict[str, str] = field(default_factory=dict)
    mode_leaves: tuple[str, ...] = ()
    mode_difference: str | None = None


@functools.cache
def _timm_registries() -> tuple[set[type], set, set[type]]:
    """timm's leaf modules and auto-wrapped functions, and the convolution subclasses to trace through."""
    try:  # by module path: timm.layers re-exports functions under the same names as these modules
        timm_fx = importlib.import_module("timm.layers._fx")
        timm_conv = importlib.import_module("timm.layers.conv2d_same")
        timm_padding = importlib.import_module("timm.layers.padding")
    except ImportError:
        return set(), set(), set()
    through = {timm_conv.Conv2dSame}
    functions = set(timm_fx._autowrap_functions) | {timm_padding.pad_same}
    return set(timm_fx._leaf_modules) - through, functions, through


@functools.cache
def timm_attention_types() -> tuple[type, ...]:
    """timm's self-attention layer, kept whole so the ViT passes find it in a captured model too."""
    try:
        return (importlib.import_module("timm.layers.attention").Attention,)
    except (ImportError, AttributeError):
        return ()


@functools.cache
def _torchvision_registries() -> tuple[set[type], tuple]:
    """torchvision's leaf modules (every ``nn.Module`` in ``torchvision.ops``) and auto-wrapped modules.

    Its list includes composites such as ``Conv2dNormActivation``; only
    modules without children are kept whole here, so composites are traced
    into and their convolutions become visible.
    """
    try:
        import torchvision
        from torchvision.models import feature_extraction
    except ImportError:
        return set(), ()
    return set(feature_extraction._get_leaf_modules_for_ops()), (torchvision.ops,)


#: Augmented assignments a traced model may make: ``x += y`` on a tensor is an in-place ``add_``.
IN_PLACE_OPERATORS = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor")


class InPlaceProxy(fx.Proxy):
    """An ``fx.Proxy`` that records augmented assignments as the in-place operators they are.

    ``fx.Proxy`` has no ``__iadd__``, so Python falls back to ``__add__``
    and ``out += identity`` (every torchvision ResNet block) is traced as an
    out-of-place addition: the captured model then allocates a new tensor
    per block where the model updated one, which cost a captured ResNet-50 7-15%
    of its eager time at batch 8.  Recorded as ``operator.iadd``, the graph
    does what the model's code does (fx prints it back as ``x += y``).
    """


def _in_place(name: str):
    target = getattr(operator, name)

    def method(self: InPlaceProxy, other):
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    method.__name__ = f"__{name}__"
    return method


for _name in IN_PLACE_OPERATORS:
    setattr(InPlaceProxy, f"__{_name}__", _in_place(_name))


class CaptureTracer(fx.Tracer):
    """An ``fx.Tracer`` with the library registries, extra leaves by type or name, and a module stack.

    ``failed_module`` is the qualified name of the innermost module whose
    tracing raised, so a failure can be pinned on it.
    """

    def __init__(self, leaf_types: Iterable[type] = (), leaf_names: Iterable[str] = (), autowrap_functions=()):
        timm_leaves, timm_functions, self.trace_through = _timm_registries()
        vision_leaves, vision_modules = _torchvision_registries()
        super().__init__(
            autowrap_modules=(math, *vision_modules),
            autowrap_functions=tuple(timm_functions) + tuple(autowrap_functions),
            param_shapes_constant=True,
        )
        # tcnn_fx's own layers and timm's attention stay whole, so analyses find them in a captured model too
        self.leaf_types = (ConvAttention2d, ConvStem, *timm_attention_types(), *timm_leaves, *leaf_types)
        self.atomic_leaf_types = tuple(vision_leaves)
        self.leaf_names = set(leaf_names)
        self.path: list[str] = []
        self.failed_module: str | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InPlaceProxy(node, self)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if qualified_name in self.leaf_names:
            return True
        if type(module) in self.trace_through:
            return False
        if isinstance(module, self.atomic_leaf_types) and next(module.children(), None) is None:
            return True
        return isinstance(module, self.leaf_types) or super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        self.path.append(self.path_of_module(module))
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module, seen first as the error unwinds
                self.failed_module = self.path[-1]
            raise
        finally:
            self.path.pop()


def _check_signature(model: nn.Module, example_inputs: tuple) -> None:
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise UsageError(f"example_inputs must be a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    for i, value in enumerate(example_inputs):
        if not isinstance(value, torch.Tensor):
            raise UsageError(
                f"example input {i} is a {type(value).__name__}; {type(model).__name__}.forward must take tensors only "
                "(wrap the model so that non-tensor arguments are fixed)"
            )
    parameters = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(parameters) > len(example_inputs):
        missing = ", ".join(p.name for p in parameters[len(example_inputs) :])
        raise UsageError(f"{type(model).__name__}.forward needs arguments {missing} that example_inputs do not give")


def _trace_with_fallback(
    model, leaf_types, leaf_names: set[str], autowrap_functions, fallbacks: dict[str, str]
) -> tuple[nn.Module, fx.Graph]:
    """Trace, making each submodule that fails a leaf, until tracing succeeds."""
    while True:
        tracer = CaptureTracer(leaf_types, leaf_names, autowrap_functions)
        try:
            graph = tracer.trace(model)
        except Exception as error:
            culprit = tracer.failed_module or ""
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            if not culprit or culprit in leaf_names:
                where = f"module '{culprit}'" if culprit else f"{type(model).__name__}.forward itself"
                children = [name for name, _ in model.named_children()]
                hint = (
                    f"; rewrite the CNN inside it instead: rewrite(model, policy, inputs, module=PATH) with PATH "
                    f"one of its submodules {children[:12]}"
                    if not culprit and children
                    else ""
                )
                raise CaptureError(f"cannot trace {where}: {reason}{hint}") from error
            if len(fallbacks) >= MAX_FALLBACKS:
                raise CaptureError(
                    f"gave up after making {MAX_FALLBACKS} modules leaves; last: '{culprit}': {reason}"
                ) from error
            leaf_names.add(culprit)
            fallbacks[culprit] = reason
            continue
        return tracer.root, graph


def _signature(graph: fx.Graph) -> list[tuple[str, str, str]]:
    """What a graph computes, node by node, without node names: (op, target, innermost module)."""
    rows = []
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        module = next(reversed(stack.values()))[0] if stack else ""
        rows.append((node.op, str(node.target), module))
    return rows


def _mode_differences(train: fx.Graph, eval_: fx.Graph) -> tuple[set[str], str | None]:
    """Innermost modules whose nodes differ between the train- and eval-mode graphs, and a description."""
    a, b = _signature(train), _signature(eval_)
    modules, lines = set(), []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        modules.update(module for *_, module in a[i1:i2] + b[j1:j2])
        lines.append(f"train {[t for _, t, _ in a[i1:i2]]} vs eval {[t for _, t, _ in b[j1:j2]]}")
    return modules, ("; ".join(lines) if lines else None)


def capture(
    model: nn.Module,
    example_inputs: tuple,
    *,
    leaf_modules: Iterable[type | str] = (),
    autowrap_functions: Iterable = (),
) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` (the model itself is not modified).

    ``leaf_modules`` adds module types or qualified names to keep whole;
    ``autowrap_functions`` adds functions to record as single nodes.  The
    returned module's ``meta['tcnn_fx.capture']`` is a ``CaptureInfo``.
    The graph module shares submodules and parameters with ``model``; copy
    the model first to change it independently.
    """
    _check_signature(model, example_inputs)
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_names = {m for m in leaf_modules if isinstance(m, str)}
    unknown = leaf_names - {name for name, _ in model.named_modules()}
    if unknown:
        raise InvalidInputError(f"leaf_modules names {sorted(unknown)} are not submodules of {type(model).__name__}")
    was_training = model.training
    fallbacks: dict[str, str] = {}
    mode_leaves: list[str] = []
    with restored_modes(model):
        while True:
            train = _trace_with_fallback(model.train(), leaf_types, leaf_names, autowrap_functions, fallbacks)
            eval_ = _trace_with_fallback(model.eval(), leaf_types, leaf_names, autowrap_functions, fallbacks)
            modules, difference = _mode_differences(train[1], eval_[1])
            new_leaves = sorted(m for m in modules if m and m not in leaf_names)
            if difference is None or not new_leaves:
                break
            leaf_names.update(new_leaves)
            mode_leaves.extend(new_leaves)
    if difference is not None:
        warnings.warn(
            f"{type(model).__name__}: the train- and eval-mode graphs differ outside any submodule "
            f"({difference}); the captured graph follows the model's current mode ({'train' if was_training else 'eval'})",
            stacklevel=2,
        )
    root, graph = train if was_training else eval_
    result = fx.GraphModule(root, graph, type(model).__name__)
    result.meta[meta.CAPTURE] = CaptureInfo(dict(fallbacks), tuple(mode_leaves), difference)
    declared = declared_stages(model)
    if declared is not None:
        result.meta[meta.DECLARED_STAGES] = declared
    return result
