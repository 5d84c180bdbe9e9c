"""Sites inside the modules capture had to keep whole.

Capture keeps a submodule whole when its code cannot be traced (data-dependent
control flow) or differs between train and eval mode (a functional drop-path
such as ``drop_connect(x, p, training=self.training)`` in third-party
EfficientNets).  Its convolutions are not graph nodes, but they are still
modules that its code calls: replacing such a module object by an attention
layer that computes the same function keeps the submodule's own code, and so
the model, exact.  These sites are found from the calls that shape
propagation recorded inside those submodules (``meta.INNER_CALLS``), and they
are offered where that replacement is exact:

* the convolution is called once, and its weight is not shared;
* it is an ``nn.Conv2d`` computing ``F.conv2d`` of its own weights, or a
  ``Conv2d`` subclass that pads through its own ``nn.ZeroPad2d``/``nn.Identity``
  children and then convolves (traced alone, its graph is one site that
  absorbs every child): the padding becomes the layer's.

Their stage and block are those of the submodule's node; their norm and
activation are not known (they are inside code that is not a graph).
Everything here is analysis.  Needs ``propagate_shapes(..., look_inside=...)``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

import torch
from torch import fx, nn

from tcnn_fx import meta
from tcnn_fx.capture import capture
from tcnn_fx.cost import convertible_site_cost, measured_conv_cost
from tcnn_fx.layers import ConvAttentionConfig, ConvGeometry
from tcnn_fx.layers.conv_attention import conv2d_mismatch
from tcnn_fx.passes.shape_prop import InnerCall, propagate_shapes, spatial_size
from tcnn_fx.sites import Site, find_sites, reduction_level

#: ``Site.kind`` of a convolution inside a module kept whole.
INNER = "inner"


def find_leaf_sites(graph_module: fx.GraphModule, config: ConvAttentionConfig | None = None) -> list[Site]:
    """The convolutions inside the modules capture kept whole, as sites (in the order they ran).

    They take the stage and block of the node that calls their module.
    Needs ``find_sites`` to have run (it writes those into ``node.meta``).
    """
    calls: dict[str, list[InnerCall]] = graph_module.meta.get(meta.INNER_CALLS, {})
    if not calls:
        return []
    config = config or ConvAttentionConfig()
    nodes = {str(n.target): n for n in graph_module.graph.nodes if n.op == "call_module"}
    network_input = spatial_size(next(n for n in graph_module.graph.nodes if n.op == "placeholder"))
    owners = Counter(id(p) for module in graph_module.modules() for p in module.parameters(recurse=False))
    found = []
    for name, recorded in calls.items():
        leaf = next(path for path in nodes if name.startswith(path + "."))
        node = nodes[leaf]
        conv = graph_module.get_submodule(name)
        geometry, reason = _geometry(conv, recorded[0].input)
        if reason is None and len(recorded) > 1:
            reason = f"it is called {len(recorded)} times inside '{leaf}' (shared weights)"
        if reason is None and any(owners[id(p)] > 1 for p in conv.parameters(recurse=False)):
            reason = "its weight is shared with another module"
        input_size, output_size = tuple(recorded[0].input.shape[-2:]), tuple(recorded[0].output.shape[-2:])
        if reason is None:
            cost = convertible_site_cost(
                geometry, conv.in_channels, conv.out_channels, input_size, bias=conv.bias is not None, config=config
            )
        else:
            cost = measured_conv_cost(
                conv.in_channels, conv.out_channels, conv.groups, conv.weight[0, 0].numel(), output_size,
                bias=conv.bias is not None,
            )  # fmt: skip
        found.append(
            Site(
                name=name, node=node.name, kind=INNER, geometry=geometry, in_channels=conv.in_channels,
                out_channels=conv.out_channels, bias=conv.bias is not None, input_size=input_size,
                output_size=output_size, level=reduction_level(network_input, output_size),
                stage=node.meta.get(meta.STAGE, 0), block=node.meta[meta.BLOCK],
                stem=False, **asdict(cost), convertible=reason is None,
                reason=None if reason is None else f"inside '{leaf}' (kept whole by capture): {reason}",
            )
        )  # fmt: skip
    return found


def _geometry(conv: nn.Conv2d, example: torch.Tensor) -> tuple[ConvGeometry, str | None]:
    """The convolution's geometry, its own padding children folded in, or why replacing it would not be exact."""
    mismatch = conv2d_mismatch(conv)
    if mismatch is None:
        return ConvGeometry.of(conv), None
    if next(conv.children(), None) is None:
        return ConvGeometry.of(conv), f"{type(conv).__name__} {mismatch}"
    try:
        graph = capture(conv, (torch.empty(example.shape, dtype=example.dtype, device="meta"),))
        propagate_shapes(graph, (example,))
        inner = find_sites(graph)
    except Exception as error:  # noqa: BLE001 - any failure means the pattern is not the known one
        return ConvGeometry.of(conv), f"{type(conv).__name__} {mismatch} ({type(error).__name__} tracing it alone)"
    modules = {n.name for n in graph.graph.nodes if n.op == "call_module"}
    if len(inner) != 1 or not inner[0].convertible or not modules <= set(inner[0].absorbed):
        return ConvGeometry.of(conv), f"{type(conv).__name__} {mismatch}"
    return inner[0].geometry, None
