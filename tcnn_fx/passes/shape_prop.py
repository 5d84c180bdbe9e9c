"""Shape propagation with fake tensors: every node learns its output's shape at no compute cost.

Results go where torch's own passes put them, ``node.meta['val']`` (a
``FakeTensor``, or a structure of them).  Parameters may be real or on the
``meta`` device, so even huge models are annotated without allocating them.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils.flop_counter import FlopCounterMode


class ShapePropagationError(RuntimeError):
    """Shape propagation failed; the message names the node and its module."""


class _NamedFakeTensorProp(FakeTensorProp):
    def run_node(self, node: fx.Node):
        try:
            return super().run_node(node)
        except Exception as error:  # noqa: BLE001 - re-raised with the node that failed
            stack = node.meta.get("nn_module_stack") or {}
            module = next(reversed(stack.values()))[0] if stack else None
            where = f"node '{node.name}'" + (f" in module '{module}'" if module else "")
            if node.op == "call_module":
                where = f"module '{node.target}'"
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ShapePropagationError(f"shape propagation failed at {where}: {reason}") from error


def propagate_shapes(graph_module: fx.GraphModule, example_inputs: tuple) -> None:
    """Annotate every node of ``graph_module`` with ``meta['val']`` for inputs shaped like ``example_inputs``.

    Only the inputs' shapes, dtypes and devices matter; their values are not read.
    """
    mode, fake = _fake_inputs(graph_module, example_inputs)
    _NamedFakeTensorProp(graph_module, mode).propagate_dont_convert_inputs(*fake)


def fake_flops(module: torch.nn.Module, example_inputs: tuple) -> int:
    """FLOPs of one forward pass of ``module`` on inputs shaped like ``example_inputs``, computed on fake tensors.

    Counted by ``torch.utils.flop_counter`` (matrix products and
    convolutions), without allocating or computing anything real.
    """
    mode, fake = _fake_inputs(module, example_inputs)
    with mode, FlopCounterMode(display=False) as counter:
        module(*fake)
    return counter.get_total_flops()


def _fake_inputs(module: torch.nn.Module, example_inputs: tuple) -> tuple[FakeTensorMode, list]:
    """A fake mode and fake copies of the inputs, on the meta device if the module's parameters are."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    parameter = next(module.parameters(), None)
    on_meta = parameter is not None and parameter.device.type == "meta"
    return mode, [mode.from_tensor(x.to("meta") if on_meta else x) for x in example_inputs]


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
