"""Sites: the convolutions of a captured graph, with their norm, activation, geometry, stage and cost.

A site is found by what its nodes *are* (module types, functions, methods),
never by names.  Convolutions are ``nn.Conv2d`` modules or ``F.conv2d`` calls
on a parameter; an explicit zero pad feeding the convolution (``F.pad``,
``nn.ZeroPad2d``, timm's ``pad_same``) belongs to the site.  Each site knows
whether ``ConvAttention2d`` can replace it and, if not, why.

A site's *stage* and *block* come from ``tcnn_fx.stages`` (structure: the
stem is stage 0, each deeper level of the downsampling hierarchy after it
one more, a residual block staged as a whole); its *level* is the log2 of
its own output's reduction from the network input, the axis resolution
rules of policies use.

Everything here is analysis: nothing changes the graph.  Needs
``propagate_shapes`` to have run.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections import Counter
from dataclasses import asdict, dataclass

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from tcnn_fx import meta
from tcnn_fx.cost import convertible_site_cost, measured_conv_cost
from tcnn_fx.errors import InvalidInputError
from tcnn_fx.layers import ConvAttentionConfig, ConvGeometry
from tcnn_fx.layers.conv_attention import conv2d_mismatch
from tcnn_fx.passes.shape_prop import spatial_size
from tcnn_fx.stages import assign_stages, blocks

NORM_TYPES: set[type] = {nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm}
NORM_FUNCTIONS: set = {F.batch_norm, F.group_norm, F.instance_norm, torch.batch_norm}
ACTIVATION_TYPES: set[type] = {
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Mish, nn.PReLU, nn.Sigmoid, nn.Tanh, nn.Softplus,
}  # fmt: skip
ACTIVATION_FUNCTIONS: set = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
}  # fmt: skip
ACTIVATION_METHODS: set[str] = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
#: Zero-pad functions and the position of their fill-value argument.
PAD_VALUE_ARGUMENT: dict = {F.pad: 3, torch.constant_pad_nd: 2}
CONV_FUNCTIONS: set = {F.conv2d, torch.conv2d}


#: ``node.meta`` keys ``find_sites`` writes: the node's stage (nodes computed from the input) and block.


def register_norm(cls: type) -> type:
    """Make modules of type ``cls`` count as a site's normalisation (usable as a class decorator)."""
    NORM_TYPES.add(cls)
    return cls


def register_activation(cls: type) -> type:
    """Make modules of type ``cls`` count as a site's activation (usable as a class decorator)."""
    ACTIVATION_TYPES.add(cls)
    return cls


@functools.cache
def _register_library_types() -> None:
    """Norms and activations of torchvision and timm, where installed (once, on first use)."""
    try:
        from torchvision.ops import FrozenBatchNorm2d

        NORM_TYPES.add(FrozenBatchNorm2d)
    except ImportError:
        pass
    try:  # by module path: timm.layers re-exports functions under some of these modules' names
        activations, norm, norm_act = (
            importlib.import_module(f"timm.layers.{name}") for name in ("activations", "norm", "norm_act")
        )
    except ImportError:
        return
    for module in (norm, norm_act):
        NORM_TYPES.update(
            cls for cls in _modules_defined_in(module) if "Norm" in cls.__name__ or "Frozen" in cls.__name__
        )
    ACTIVATION_TYPES.update(_modules_defined_in(activations))


def _modules_defined_in(module) -> list[type]:
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__
    ]


@dataclass(frozen=True)
class Site:
    """One convolution of the graph with what follows it, its geometry, place and cost.

    ``name`` is the qualified name of the convolution module (for a
    functional convolution, of the module owning its weight).  Sizes are
    ``(height, width)`` at the traced input size; FLOPs and parameters are per
    image, as a convolution and as ``ConvAttention2d``.
    """

    name: str
    node: str
    kind: str  # "module" or "functional"
    geometry: ConvGeometry
    in_channels: int
    out_channels: int
    bias: bool
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    level: int
    stage: int
    block: int
    stem: bool
    conv_flops: int
    attention_flops: int
    conv_params: int
    attention_params: int
    convertible: bool
    input_node: str = ""
    reason: str | None = None
    pad_node: str | None = None
    absorbed: tuple[str, ...] = ()
    norm_node: str | None = None
    norm_type: str | None = None
    activation_node: str | None = None
    activation_type: str | None = None

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.geometry.kernel_size

    @property
    def resolution(self) -> int:
        """The larger side of the output, the resolution rules of policies compare against."""
        return max(self.output_size)

    def to_dict(self) -> dict:
        row = asdict(self)
        row["geometry"] = asdict(self.geometry)
        return row


def _module(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return graph_module.get_submodule(node.target) if node.op == "call_module" else None


def is_norm(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    module = _module(graph_module, node)
    if module is not None:
        return isinstance(module, tuple(NORM_TYPES))
    return node.op == "call_function" and node.target in NORM_FUNCTIONS


def is_activation(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    module = _module(graph_module, node)
    if module is not None:
        return isinstance(module, tuple(ACTIVATION_TYPES))
    if node.op == "call_method":
        return node.target in ACTIVATION_METHODS
    return node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS


def _fused_norm_activation(module: nn.Module | None) -> bool:
    """timm's norm+activation leaves (``BatchNormAct2d`` ...) apply their activation themselves."""
    return module is not None and hasattr(module, "act") and isinstance(module.act, tuple(ACTIVATION_TYPES))


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _type_name(graph_module: fx.GraphModule, node: fx.Node) -> str:
    module = _module(graph_module, node)
    if module is not None:
        return type(module).__name__
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _zero_pad_sides(graph_module: fx.GraphModule, node: fx.Node) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of a spatial zero pad by constant amounts, or ``None`` if ``node`` is not one.

    Amounts computed from the input size (TensorFlow-style 'same', timm's
    ``pad_same``) are not constant: such a pad stays in the graph before the
    converted layer, so the hybrid pads as the model does at every input size.
    """
    module = _module(graph_module, node)
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
        if isinstance(module, nn.ConstantPad2d) and module.value != 0:
            return None
        left, right, top, bottom = module.padding
        return (top, bottom, left, right)
    if node.op != "call_function" or node.target not in PAD_VALUE_ARGUMENT:
        return None
    position = PAD_VALUE_ARGUMENT[node.target]
    value = node.kwargs.get("value", node.args[position] if len(node.args) > position else 0)
    mode = node.kwargs.get("mode", node.args[2] if node.target is F.pad and len(node.args) > 2 else "constant")
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if mode != "constant" or value not in (0, 0.0, None) or spatial_size(node.args[0]) is None:
        return None
    if isinstance(pad, (list, tuple)) and len(pad) == 4 and all(isinstance(p, int) for p in pad):
        left, right, top, bottom = pad
        return (top, bottom, left, right)
    return None


def _conv_arguments(node: fx.Node) -> dict:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    return defaults | dict(zip(names, node.args)) | dict(node.kwargs)


class _SiteBuilder:
    """Collects the raw facts of each convolution node before stages and blocks are known."""

    def __init__(self, graph_module: fx.GraphModule, config: ConvAttentionConfig):
        self.graph_module = graph_module
        self.config = config
        self.call_counts = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")

    def facts(self, node: fx.Node) -> dict | None:
        module = _module(self.graph_module, node)
        if isinstance(module, nn.Conv2d):
            return self._module_facts(node, module)
        if node.op == "call_function" and node.target in CONV_FUNCTIONS:
            return self._functional_facts(node)
        return None

    def _module_facts(self, node: fx.Node, conv: nn.Conv2d) -> dict:
        geometry = ConvGeometry.of(conv)
        mismatch = conv2d_mismatch(conv)
        reason = f"{type(conv).__name__} {mismatch}" if mismatch else None
        if reason is None and self.call_counts[node.target] > 1:
            reason = f"the module is called at {self.call_counts[node.target]} places in the graph (shared weights)"
        return self._with_pad(node, node.args[0], dict(
            name=node.target, owner=node.target, kind="module", geometry=geometry, in_channels=conv.in_channels,
            out_channels=conv.out_channels, bias=conv.bias is not None, reason=reason,
        ))  # fmt: skip

    def _functional_facts(self, node: fx.Node) -> dict:
        args = _conv_arguments(node)
        weight = args["weight"]
        out_channels, in_per_group, kh, kw = weight.meta["val"].shape
        padding = args["padding"]
        geometry = ConvGeometry.resolve((kh, kw), args["stride"], padding, args["dilation"], args["groups"])
        is_attribute = isinstance(weight, fx.Node) and weight.op == "get_attr"
        name = weight.target.rsplit(".", 1)[0] if is_attribute and "." in weight.target else node.name
        reason = None
        if not is_attribute:
            reason = "the weight is computed in forward (e.g. weight standardisation), not a parameter"
        elif not self._is_parameter(weight.target):
            reason = "the weight is a buffer (a fixed filter such as a blur), not a parameter"
        bias = args["bias"]
        if bias is not None and not (
            isinstance(bias, fx.Node) and bias.op == "get_attr" and self._is_parameter(bias.target)
        ):
            reason = reason or "the bias is not a parameter"
        owner = weight.target.rsplit(".", 1)[0] if is_attribute and "." in weight.target else ""
        return self._with_pad(node, args["input"], dict(
            name=name, owner=owner, kind="functional", geometry=geometry, in_channels=in_per_group * args["groups"],
            out_channels=out_channels, bias=bias is not None, reason=reason,
        ))  # fmt: skip

    def _is_parameter(self, target: str) -> bool:
        try:
            self.graph_module.get_parameter(target)
        except AttributeError:
            return False
        return True

    def _with_pad(self, node: fx.Node, source: fx.Node, facts: dict) -> dict:
        """Absorb what feeds only this convolution on the way in: a zero pad by constant amounts, and the
        convolution module's own ``nn.Identity`` or pad children (a ``Conv2d`` subclass that owns its
        'same' padding calls them in its ``forward``)."""
        facts["node"], facts["pad_node"] = node.name, None
        absorbed = []
        while len(source.users) == 1 and self._owned_identity(source, facts["owner"]):
            absorbed.append(source.name)
            source = source.args[0]
        sides = _zero_pad_sides(self.graph_module, source) if len(source.users) == 1 else None
        geometry: ConvGeometry = facts["geometry"]
        if sides is not None and geometry.padding_mode == "zeros":
            total = tuple(a + b for a, b in zip(sides, geometry.padding))
            facts["geometry"] = ConvGeometry(
                geometry.kernel_size, geometry.stride, geometry.dilation, total, "zeros", geometry.groups
            )
            facts["pad_node"] = source.name
            absorbed.append(source.name)
            source = source.args[0]
            while len(source.users) == 1 and self._owned_identity(source, facts["owner"]):
                absorbed.append(source.name)
                source = source.args[0]
        facts["absorbed"] = tuple(absorbed)
        facts["input_node"] = source.name
        facts["input_size"] = spatial_size(source)
        facts["output_size"] = spatial_size(node)
        facts.update(self._followers(node))
        return facts

    def _owned_identity(self, node: fx.Node, owner: str) -> bool:
        """An ``nn.Identity`` child of the convolution's own module (what a 'same' pad is when none is needed);
        ``owner`` is that module's path, ``''`` for the graph's root."""
        return (
            node.op == "call_module"
            and str(node.target).startswith(owner + "." if owner else "")
            and isinstance(_module(self.graph_module, node), nn.Identity)
        )

    def _followers(self, node: fx.Node) -> dict:
        found = dict(norm_node=None, norm_type=None, activation_node=None, activation_type=None)
        follower = _only_user(node)
        if follower is not None and is_norm(self.graph_module, follower):
            found["norm_node"], found["norm_type"] = follower.name, _type_name(self.graph_module, follower)
            if _fused_norm_activation(_module(self.graph_module, follower)):
                found["activation_node"], found["activation_type"] = follower.name, found["norm_type"]
                return found
            follower = _only_user(follower)
        if follower is not None and is_activation(self.graph_module, follower):
            found["activation_node"], found["activation_type"] = follower.name, _type_name(self.graph_module, follower)
        return found


def reduction_level(input_size: tuple[int, int], output_size: tuple[int, int]) -> int:
    """log2 of an output's reduction from the network input (the larger side's): a site's ``level``."""
    return max(round(math.log2(i / o)) for i, o in zip(input_size, output_size))


def find_sites(graph_module: fx.GraphModule, config: ConvAttentionConfig | None = None) -> list[Site]:
    """Every convolution site of ``graph_module``, in graph order.

    ``config`` is the attention layer configuration the attention costs are
    computed for.  Needs ``propagate_shapes`` to have run.
    """
    _register_library_types()
    config = config or ConvAttentionConfig()
    graph = graph_module.graph
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    network_input = spatial_size(placeholder)
    if network_input is None:
        raise InvalidInputError(f"the first input '{placeholder.name}' is not an NCHW image batch; sites need one")
    builder = _SiteBuilder(graph_module, config)
    raw = [facts for node in graph.nodes if (facts := builder.facts(node)) is not None]
    for facts in raw:
        facts["level"] = reduction_level(network_input, facts["output_size"])
    opaque = {  # modules kept whole that hold convolutions
        node.name for node in graph.nodes
        if (module := _module(graph_module, node)) is not None and not isinstance(module, nn.Conv2d)
        and any(isinstance(m, nn.Conv2d) for m in module.modules())
    }  # fmt: skip
    stage_of, stem = assign_stages(graph_module, {facts["node"]: facts["geometry"] for facts in raw}, opaque)
    block_of = blocks(graph)
    for node in graph.nodes:
        if node.name in stage_of:
            node.meta[meta.STAGE] = stage_of[node.name]
        node.meta[meta.BLOCK] = block_of[node.name]
    sites = []
    for facts in raw:
        geometry, size = facts["geometry"], facts["input_size"]
        reason = facts.pop("reason")
        facts.pop("owner")
        try:
            cost = convertible_site_cost(
                geometry, facts["in_channels"], facts["out_channels"], size, bias=facts["bias"], config=config
            )
        except ValueError:
            if reason is None:
                raise
            # A module whose forward pads on its own (its geometry alone does not fit its input): it computes
            # something else than its geometry says, is not convertible, and costs what its output says.
            cost = measured_conv_cost(
                facts["in_channels"], facts["out_channels"], geometry.groups, geometry.num_taps,
                facts["output_size"], bias=facts["bias"],
            )  # fmt: skip
        sites.append(
            Site(
                **facts,
                stage=stage_of[facts["node"]],
                block=block_of[facts["node"]],
                stem=facts["node"] in stem,
                **asdict(cost),
                convertible=reason is None,
                reason=reason,
            )
        )
    return sites


def site_graph(graph_module: fx.GraphModule, sites: list[Site]) -> nx.DiGraph:
    """Dataflow between sites: an edge when one site's output reaches another's input through no other site.

    Node attributes are the sites' scalar fields, so the graph exports as is
    with ``networkx.write_graphml`` or ``networkx.nx_pydot.write_dot``.
    """
    by_node = {site.node: site for site in sites}
    absorbed_by = {name: site.node for site in sites for name in site.absorbed}
    graph = nx.DiGraph()
    for site in sites:
        graph.add_node(site.name, **_scalar_attributes(site))
    nodes = {n.name: n for n in graph_module.graph.nodes}
    for site in sites:
        frontier, seen = list(nodes[site.node].users), set()
        while frontier:
            node = frontier.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            target = by_node.get(node.name) or by_node.get(absorbed_by.get(node.name, ""))
            if target is not None:
                graph.add_edge(site.name, target.name)
            else:
                frontier.extend(node.users)
    return graph


def _scalar_attributes(site: Site) -> dict:
    row = {}
    for key, value in site.to_dict().items():
        if key == "geometry":
            for gkey, gvalue in value.items():
                row[gkey] = str(gvalue) if isinstance(gvalue, (tuple, list)) else gvalue
        elif isinstance(value, (tuple, list)):
            row[key] = "x".join(map(str, value))
        elif value is not None:
            row[key] = value
    return row
