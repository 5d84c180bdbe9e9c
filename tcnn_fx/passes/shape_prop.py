"""Shape propagation on the ``meta`` device: every node learns its output's shape at no compute cost.

The graph runs once on meta tensors (shapes and dtypes, no data): inputs,
parameters and buffers are swapped for meta stand-ins, so nothing real is
allocated or computed, whatever the model's size, and the model's own tensors
are never touched.  Results go where torch's own passes put them:
``node.meta['val']`` (a meta tensor, or a structure of them).  The same run
counts the model's FLOPs.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from tcnn_fx import meta
from tcnn_fx.errors import InvalidInputError, TcnnFxError


class _FlopCounter(TorchDispatchMode):
    """Total FLOPs of the operators ``torch.utils.flop_counter`` has formulas for.

    The same formulas and totals as ``FlopCounterMode``, without its
    per-module bookkeeping, which would cost a third of the propagation.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class ShapePropagationError(TcnnFxError, RuntimeError):
    """Shape propagation failed; the message names the node and its module."""


def _meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


#: ``graph_module.meta[meta.INNER_CALLS]``: for each ``nn.Conv2d`` inside a module capture kept whole, its calls.


@dataclass(frozen=True)
class InnerCall:
    """One call of a convolution inside a module kept whole: its input and output as meta tensors."""

    input: torch.Tensor
    output: torch.Tensor


class MetaShapeProp(fx.Interpreter):
    """Run a graph on meta tensors, recording each node's output in ``node.meta['val']``.

    Inside the modules named in ``look_inside`` (those capture had to keep
    whole), every ``nn.Conv2d``'s calls are recorded too (``inner_calls``), so
    the site table can offer them.
    """

    def __init__(self, module: fx.GraphModule, look_inside: tuple[str, ...] = ()):
        super().__init__(module)
        self.look_inside = set(look_inside)
        self.inner_calls: dict[str, list[InnerCall]] = {}

    def run_node(self, node: fx.Node):
        try:
            value = super().run_node(node)
        except Exception as error:  # noqa: BLE001 - re-raised with the node that failed
            raise ShapePropagationError(f"shape propagation failed at {_where(node)}: {_reason(error)}") from error
        node.meta["val"] = value
        return value

    def get_attr(self, target, args, kwargs):
        return _meta(super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and len(args) == 1 and not kwargs:
            return _batch_norm_output(module, args[0])
        state = {name: _meta(t) for name, t in [*module.named_parameters(), *module.named_buffers()]}
        if target not in self.look_inside:
            return functional_call(module, state, args, kwargs)
        # A module capture kept whole may branch on tensor values, which meta tensors do not have: it then
        # runs for real, on zeros, as an eval-mode copy (the model's own statistics are never updated).
        try:
            with self._recording(target, module):
                return functional_call(module, state, args, kwargs)
        except (NotImplementedError, RuntimeError) as error:
            if "meta" not in str(error):
                raise
        self.inner_calls = {k: v for k, v in self.inner_calls.items() if not k.startswith(target + ".")}
        copy_ = copy.deepcopy(module).eval()
        device = next((t.device for t in module.parameters()), torch.device("cpu"))
        real = [torch.zeros(a.shape, dtype=a.dtype, device=device) if isinstance(a, torch.Tensor) else a for a in args]
        with self._recording(target, copy_):
            return _meta_tree(copy_(*real, **kwargs))

    @contextlib.contextmanager
    def _recording(self, target: str, module: nn.Module):
        """Record the calls of every ``nn.Conv2d`` inside ``module`` (named under ``target``) while the body runs."""
        handles = [
            conv.register_forward_hook(self._recorder(f"{target}.{name}"))
            for name, conv in module.named_modules()
            if name and isinstance(conv, nn.Conv2d)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _recorder(self, name: str):
        def record(module, args, output):
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                self.inner_calls.setdefault(name, []).append(InnerCall(_meta(args[0]), _meta(output)))

        return record


def _meta_tree(value):
    """A module's output with every tensor in it moved to the meta device."""
    if isinstance(value, torch.Tensor):
        return _meta(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_meta_tree(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _meta_tree(v)) for k, v in value.items())
    return value


def _batch_norm_output(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """A batch norm's output on meta tensors: its input's shape and dtype, after the norm's own checks.

    Running it would go through PyTorch's Python decomposition of batch norm
    for the meta device, which was 60% of the propagation's time on
    ResNet-152, for an answer known in advance (and no FLOPs counted).
    """
    norm._check_input_dim(x)
    if x.shape[1] != norm.num_features:
        raise InvalidInputError(
            f"{type(norm).__name__}({norm.num_features}) got an input with {x.shape[1]} channels (shape {tuple(x.shape)})"
        )
    return torch.empty_like(x)


def _where(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else None
    return f"node '{node.name}'" + (f" in module '{module}'" if module else "")


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def propagate_shapes(graph_module: fx.GraphModule, example_inputs: tuple, look_inside: tuple[str, ...] = ()) -> None:
    """Annotate every node with ``meta['val']`` for inputs shaped like ``example_inputs``.

    Only the inputs' shapes and dtypes matter, not their values or devices.
    Also stores the FLOPs of one forward pass (``torch.utils.flop_counter``:
    matrix products and convolutions) in ``graph_module.meta['tcnn_fx.flops']``,
    and the calls of the convolutions inside the modules ``look_inside`` names
    in ``graph_module.meta[meta.INNER_CALLS]``.
    """
    propagation = MetaShapeProp(graph_module, look_inside)
    try:
        with torch.no_grad(), _FlopCounter() as counter:
            propagation.run(*(_meta(x) for x in example_inputs))
    except ShapePropagationError as error:  # torch.fx appended its own multi-line trace to the message
        raise ShapePropagationError(str(error).splitlines()[0]) from error.__cause__
    graph_module.meta[meta.FLOPS] = counter.total
    graph_module.meta[meta.INNER_CALLS] = propagation.inner_calls


def spatial_size(node: fx.Node) -> tuple[int, int] | None:
    """Height and width of a node's NCHW output, or ``None`` if it is not a 4-d tensor.

    Needs ``propagate_shapes`` to have run.
    """
    if "val" not in node.meta:
        raise InvalidInputError(f"node '{node.name}' has no shape: run propagate_shapes first")
    value = node.meta["val"]
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        return int(value.shape[-2]), int(value.shape[-1])
    return None
