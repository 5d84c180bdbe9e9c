"""Shape propagation on the ``meta`` device: every node learns its output's shape at no compute cost.

The graph runs once on meta tensors (shapes and dtypes, no data): inputs,
parameters and buffers are swapped for meta stand-ins, so nothing real is
allocated or computed, whatever the model's size, and the model's own tensors
are never touched.  Results go where torch's own passes put them:
``node.meta['val']`` (a meta tensor, or a structure of them).  The same run
counts the model's FLOPs.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

FLOPS_KEY = "tcnn_fx.flops"


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


class ShapePropagationError(RuntimeError):
    """Shape propagation failed; the message names the node and its module."""


def _meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


class MetaShapeProp(fx.Interpreter):
    """Run a graph on meta tensors, recording each node's output in ``node.meta['val']``."""

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
        return functional_call(module, state, args, kwargs)


def _batch_norm_output(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """A batch norm's output on meta tensors: its input's shape and dtype, after the norm's own checks.

    Running it would go through PyTorch's Python decomposition of batch norm
    for the meta device, which was 60% of the propagation's time on
    ResNet-152, for an answer known in advance (and no FLOPs counted).
    """
    norm._check_input_dim(x)
    if x.shape[1] != norm.num_features:
        raise ValueError(
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


def propagate_shapes(graph_module: fx.GraphModule, example_inputs: tuple) -> None:
    """Annotate every node with ``meta['val']`` for inputs shaped like ``example_inputs``.

    Only the inputs' shapes and dtypes matter, not their values or devices.
    Also stores the FLOPs of one forward pass (``torch.utils.flop_counter``:
    matrix products and convolutions) in ``graph_module.meta['tcnn_fx.flops']``.
    """
    with torch.no_grad(), _FlopCounter() as counter:
        MetaShapeProp(graph_module).run(*(_meta(x) for x in example_inputs))
    graph_module.meta[FLOPS_KEY] = counter.total


def spatial_size(node: fx.Node) -> tuple[int, int] | None:
    """Height and width of a node's NCHW output, or ``None`` if it is not a 4-d tensor.

    Needs ``propagate_shapes`` to have run.
    """
    if "val" not in node.meta:
        raise ValueError(f"node '{node.name}' has no shape: run propagate_shapes first")
    value = node.meta["val"]
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        return int(value.shape[-2]), int(value.shape[-1])
    return None
