"""Stages: where in the network's downsampling hierarchy each node is, derived from the graph's structure.

Users name stages the way model libraries do: ResNet's ``layer1`` .. ``layer4``
are stages 1 .. 4, ConvNeXt's ``stages.3`` is stage 4, RegNet's ``s4`` is
stage 4.  Those names follow *structure*, not the resolution of each single
convolution: a residual block that downsamples belongs wholly to the stage it
opens, even its first 1x1 convolution, which still runs at the previous
resolution (RegNet, ResNet), and even its 3x3 convolution when the block
pools after it (ResNeSt's avg-down).  A dilated backbone (DeepLabV3's ResNet)
keeps ``layer3``/``layer4`` at 1/8 resolution, yet they are stages 3 and 4.

So a stage is computed from three analyses of the captured graph:

* **depth** of every node: log2 of its output's reduction from the network
  input, plus log2 of a convolution's dilation where that is a power of two
  (dilation standing in for a stride: 2 and 4 in DeepLabV3; ASPP rates such
  as 12 or 36 are receptive fields, not strides), and never less than the
  depth of its inputs.  Globally pooled features (squeeze-excitation) add no
  depth of their own, and upsampled features (FPN, decoders) do not go back.
* **join** of a node: the first node that every path from it to an output
  passes through and that merges in a value computed without it, the
  residual addition that closes its block.  A node's *stage depth* is the
  larger of its own depth and its join's own level (recursively), so a
  block is staged as a whole; a 1x1 expansion feeding a strided
  convolution is staged with it.
* **blocks**: the nodes no other value is live across (the outputs of
  residual blocks; the model's outputs are not counted as later uses, so a
  feature extractor returning every stage's output still has blocks).  A
  depth gained by dilation alone is moved back to the block of that stage
  that changed the channel width (``layer3.0``), because the first block of a
  dilated stage keeps the previous dilation.

The *stem*, the chain of nodes from the input before the first branch or merge
(and before the first depth gained after its first convolution), is stage 0
even where it shares its resolution with the first stage.  The distinct stage
depths after the stem are stages 1, 2, ... in order.  Nothing here depends on
module names or on which submodules capture kept whole (a module kept whole
has the same output shape, hence the same depth).  Where the model declares
its stages (timm's ``feature_info``), the declaration groups the blocks
instead (``_declared``); one that does not fit the graph is ignored.

Everything here is analysis: nothing changes the graph.  Needs
``propagate_shapes`` to have run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx

from tcnn_fx import meta
from tcnn_fx.errors import InvalidInputError
from tcnn_fx.layers import ConvGeometry
from tcnn_fx.passes.shape_prop import spatial_size


@dataclass(frozen=True)
class Stage:
    """One stage of a model as its sites show it: number, resolution, the modules it spans.

    ``modules`` are the module paths that hold its sites and no other
    stage's (``('layer4',)``; ``('features.13', 'features.14', ...)``), as
    users find them in the model.
    """

    index: int
    resolution: tuple[int, int]
    modules: tuple[str, ...]
    sites: int

    def describe(self) -> str:
        """``'4 (7x7: layer4)'``: the stage as a ``PolicyError`` or a table lists it."""
        return f"{self.index} ({self.resolution[0]}x{self.resolution[1]}: {module_span(self.modules)})"


def module_span(modules: tuple[str, ...]) -> str:
    """``layer4``, or ``features.13 .. features.16`` for a stage made of several sibling modules."""
    if not modules:
        return "-"
    if len(modules) == 1:
        return modules[0]
    return f"{modules[0]} .. {modules[-1]}"


def _holds_tensors(node: fx.Node) -> bool:
    """A tensor, or a tuple of them (``chunk``, ``split``); ``x.shape`` and its arithmetic are not dataflow."""
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr" and _holds_tensors(a)]


def _tensor_users(node: fx.Node) -> list[fx.Node]:
    """Users of a node that compute tensors: reading ``x.shape`` is not a branch of the dataflow."""
    return [user for user in node.users if _holds_tensors(user) or user.op == "output"]


def _power_of_two_log(value: int) -> int:
    return int(math.log2(value)) if value > 1 and value & (value - 1) == 0 else 0


def node_depths(
    graph: fx.Graph, network_input: tuple[int, int], convolutions: dict[str, ConvGeometry]
) -> tuple[dict[str, int], dict[str, int]]:
    """Depth of every node computed from the input (see the module docstring), and each node's own level:
    its resolution's (and dilation's) alone, without what it inherits from its inputs."""
    depths: dict[str, int] = {}
    levels: dict[str, int] = {}
    pooled: set[str] = set()
    for node in graph.nodes:
        if not _holds_tensors(node):
            continue
        inputs = _tensor_inputs(node)
        inherited = max((depths[a.name] for a in inputs if a.name in depths), default=None)
        size = spatial_size(node) if node.op != "output" else None
        own = None
        from_input = [a for a in inputs if a.name in depths]  # not computed from parameters alone
        if from_input and all(a.name in pooled for a in from_input):
            pooled.add(node.name)  # computed from globally pooled features only (squeeze-excitation)
        elif (from_input or node.op == "placeholder") and size is not None and min(size) > 0:
            strided_conv = node.name in convolutions and any(
                (size_in := spatial_size(a)) is not None and size_in != (1, 1) for a in inputs
            )
            if size == (1, 1) != network_input and not strided_conv:
                pooled.add(node.name)  # a global pool
            else:
                own = max(round(math.log2(i / o)) for i, o in zip(network_input, size))
                own += max(map(_power_of_two_log, convolutions[node.name].dilation)) if node.name in convolutions else 0
                levels[node.name] = own
        candidates = [d for d in (own, inherited) if d is not None]
        if candidates:
            depths[node.name] = max(candidates)
    return depths, levels


def stem_nodes(
    graph: fx.Graph, depths: dict[str, int], convolutions: set[str], expansions: set[str], opaque: set[str]
) -> list[str]:
    """The stem: nodes on the chain from the first input before the first fan-out or merge.

    The chain stops, too, at the first node deeper than the chain's first
    convolution (VGG has no branch at all: its first block is the stem), at
    the expansion of a downsampling block (MobileNetV2's ``features.2``) and
    at a module kept whole that holds convolutions (``opaque``: its inside
    is not known to be a chain).
    """
    node = next(n for n in graph.nodes if n.op == "placeholder")
    chain: list[str] = []
    first_conv_depth = None
    while len(users := _tensor_users(node)) == 1:
        node = users[0]
        if len(_tensor_inputs(node)) != 1 or node.op == "output" or node.name in opaque:
            break
        depth = depths.get(node.name)
        if first_conv_depth is not None and (node.name in expansions or depth is not None and depth > first_conv_depth):
            break
        if node.name in convolutions and first_conv_depth is None:
            first_conv_depth = depth
        chain.append(node.name)
    if first_conv_depth is None:
        return []  # no convolution before the first branch: the model has no stem
    return chain


def blocks(graph: fx.Graph) -> dict[str, int]:
    """Block index of every node: a block ends at a node that no other value is live across.

    In a ResNet those are the outputs of the residual blocks; in a plain
    chain (VGG) every node is one; a DenseNet's dense block has none inside.
    The model's outputs are not counted as uses, so a feature extractor that
    returns every stage's output keeps its blocks.
    """
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    last_use = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        for source in _tensor_inputs(node):  # shape arithmetic read late (x.shape) keeps no block open
            last_use[source.name] = max(last_use.get(source.name, -1), order[node.name])
    # A node ends a block when no value computed before it is used after it.
    result, index, reach = {}, 0, -1
    for node in graph.nodes:
        result[node.name] = index
        if node.op not in ("placeholder", "get_attr"):
            if reach <= order[node.name] and node.op != "output":
                index += 1
        if node.op != "get_attr":
            reach = max(reach, last_use.get(node.name, -1))
    return result


class _Dataflow:
    """The tensor dataflow of a graph from its inputs, with dominators (what every path from the input passes
    through) and post-dominators (what every path to an output passes through)."""

    START, EXIT = "__input__", "__exit__"

    def __init__(self, graph: fx.Graph):
        dataflow = nx.DiGraph()
        for node in graph.nodes:
            if node.op in ("get_attr", "output") or not _holds_tensors(node):
                continue
            dataflow.add_node(node.name)
            dataflow.add_edges_from((source.name, node.name) for source in _tensor_inputs(node))
            if node.op == "placeholder":
                dataflow.add_edge(self.START, node.name)
        reachable = nx.descendants(dataflow, self.START) | {self.START}  # parameters alone are no dataflow
        self.graph = dataflow = dataflow.subgraph(reachable).copy()
        dataflow.add_edges_from((n, self.EXIT) for n in list(dataflow.nodes) if dataflow.out_degree(n) == 0)
        tree = nx.DiGraph(
            (parent, child)
            for child, parent in nx.immediate_dominators(dataflow, self.START).items()
            if child != parent
        )
        # Pre/post-order numbers on the dominator tree: a dominates b iff a's interval holds b's.
        self._entered, self._left, clock = {self.START: 0}, {}, 0
        for _, child, kind in nx.dfs_labeled_edges(tree, self.START):
            clock += 1
            if kind == "forward":
                self._entered[child] = clock
            elif kind == "reverse":
                self._left[child] = clock
        self._left[self.START] = clock + 1
        self.post_dominator = nx.immediate_dominators(dataflow.reverse(copy=False), self.EXIT)
        self.merges = {n for n in dataflow.nodes if dataflow.in_degree(n) > 1 and n != self.EXIT}

    def dominates(self, a: str, b: str) -> bool:
        return b in self._entered and self._entered[a] <= self._entered[b] and self._left[b] <= self._left[a]

    def merges_foreign(self, node: str, merge: str) -> bool:
        """Whether ``merge`` merges in a value ``node`` does not dominate (one computed without it)."""
        return merge in self.merges and any(not self.dominates(node, p) for p in self.graph.predecessors(merge))

    def joins(self) -> dict[str, str]:
        """For each node, the first post-dominator that merges in a value computed without it: the addition
        closing its residual block."""
        nodes = [n for n in nx.topological_sort(self.graph) if n not in (self.START, self.EXIT)]
        next_merge: dict[str, str] = {}
        for name in reversed(nodes):
            following = self.post_dominator[name]
            at_merge = following in self.merges or following == self.EXIT
            next_merge[name] = following if at_merge else next_merge[following]
        joins = {}
        for name in nodes:
            step = next_merge[name]
            while step != self.EXIT:
                if self.merges_foreign(name, step):
                    joins[name] = step
                    break
                step = next_merge[step]
        return joins

    def expansions(self, depths: dict[str, int], convolutions: dict[str, ConvGeometry]) -> dict[str, str]:
        """Pointwise convolutions whose output reaches, before any foreign merge, a deeper convolution that
        every path from them passes through: the expansion of an inverted-residual block that downsamples
        (MobileNet, EfficientNet), staged with that block.  Maps the expansion and the post-dominators on
        the way (its norm, its activation, even ``x * sigmoid(x)``) to that convolution."""
        found = {}
        for name, geometry in convolutions.items():
            if geometry.kernel_size != (1, 1) or name not in depths or name not in self.graph:
                continue
            chain, step = [name], self.post_dominator[name]
            while step != self.EXIT and not self.merges_foreign(name, step):
                if step in convolutions:
                    if depths.get(step, -1) > depths[name]:
                        found.update(dict.fromkeys(chain, step))
                    break
                chain.append(step)
                step = self.post_dominator[step]
        return found


def _dilation_gains(
    graph: fx.Graph, depths: dict[str, int], block_of: dict[str, int], stem: set[str]
) -> dict[str, int]:
    """Depths raised back to the block that opened a dilated stage.

    A node deeper than its inputs by dilation alone (its resolution did not
    change) opens a dilated stage; the nodes from the latest block since the
    previous deepening that changed the channel width (``layer3.0``, which
    keeps the previous dilation) are raised to its depth, and so is what
    follows them.
    """
    nodes = list(graph.nodes)
    width = {n.name: n.meta["val"].shape[1] for n in nodes if spatial_size(n) is not None}
    first, last = {}, {}
    for position, node in enumerate(nodes):
        first.setdefault(block_of[node.name], position)
        last[block_of[node.name]] = position
    raised = dict(depths)
    previous_deepening = 0
    for position, node in enumerate(nodes):
        inputs = _tensor_inputs(node)
        before = max((raised.get(a.name, -1) for a in inputs), default=-1)
        if node.name in stem or node.name not in raised or raised[node.name] <= before or not inputs:
            continue
        if spatial_size(node) in [spatial_size(a) for a in inputs]:  # deeper by dilation alone
            start = position
            for block in range(block_of[node.name] - 1, block_of[nodes[previous_deepening].name], -1):
                end, before_block = nodes[last[block]].name, nodes[first[block] - 1].name
                if end in width and before_block in width and width[end] != width[before_block]:
                    start = first[block]
                    break
            for offset, later in enumerate(nodes[start:]):
                if later.name not in raised or later.name in stem:
                    continue
                floor = raised[node.name] if start + offset < position else -1
                inherited = max((raised.get(a.name, -1) for a in _tensor_inputs(later)), default=-1)
                raised[later.name] = max(raised[later.name], inherited, floor)
        previous_deepening = position
    return raised


#: Where ``capture`` records the stages a model declares (module paths, in order): ``graph_module.meta[...]``.


def declared_stages(model) -> tuple[str, ...] | None:
    """The module paths of the stages ``model`` declares (timm's ``feature_info``), or ``None``.

    Each entry is the module whose output a feature extractor takes: the end
    of a stage.  A declaration that names no module (``''``) is not one.
    """
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info
    try:
        modules = tuple(entry["module"] for entry in entries)
    except (TypeError, KeyError):
        return None
    return modules if modules and all(isinstance(m, str) and m for m in modules) else None


def assign_stages(
    graph_module: fx.GraphModule, convolutions: dict[str, ConvGeometry], opaque: set[str] = frozenset()
) -> tuple[dict[str, int], set[str]]:
    """Stage of every node computed from the input, and the stem's node names.

    ``convolutions`` maps each convolution node name to its geometry (the
    convolutions the sites found); ``opaque`` names the nodes of modules kept
    whole that hold convolutions.  The model's declared stages
    (``meta[meta.DECLARED_STAGES]``), where capture found a consistent declaration,
    decide which block belongs to which stage; otherwise the structure does.
    Needs ``propagate_shapes`` to have run.
    """
    graph = graph_module.graph
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    network_input = spatial_size(placeholder)
    if network_input is None:
        raise InvalidInputError(f"the first input '{placeholder.name}' is not an NCHW image batch; stages need one")
    depths, levels = node_depths(graph, network_input, convolutions)
    dataflow = _Dataflow(graph)
    expansions = dataflow.expansions(depths, convolutions)
    stem = set(stem_nodes(graph, depths, set(convolutions), set(expansions), opaque))
    block_of = blocks(graph)
    declared = _declared(graph, graph_module.meta.get(meta.DECLARED_STAGES), depths, stem, block_of)
    if declared is not None:
        return declared
    depths = _dilation_gains(graph, depths, block_of, stem)
    joins = dataflow.joins()
    inputs = {n.name for n in graph.nodes if n.op == "placeholder"}
    # How deep a node's block goes: its own level, and that of its join and expanded convolution, recursively.
    # Own levels, not inherited depths: a decoder's addition at 1/8 that merges upsampled 1/32 features
    # (LR-ASPP, U-Nets) is at 1/8 and raises nothing before it.
    reach: dict[str, int] = {}
    stage_depth: dict[str, int] = {}
    for node in reversed(graph.nodes):  # joins and expanded convolutions come later in the graph
        name = node.name
        ahead = [reach[target] for target in (joins.get(name), expansions.get(name)) if target in reach]
        reach[name] = max([levels.get(name, -1), *ahead])
        if name in depths and name not in stem and name not in inputs:
            stage_depth[name] = max([depths[name], *ahead])
    levels = sorted(set(stage_depth.values()))
    stage_of = {name: 0 for name in stem}
    stage_of.update({name: levels.index(depth) + 1 for name, depth in stage_depth.items()})
    return stage_of, stem


def _module_paths(node: fx.Node) -> set[str]:
    paths = {path for path, _ in (node.meta.get("nn_module_stack") or {}).values()}
    if node.op == "call_module":
        paths.add(str(node.target))
    return paths


def _inside(paths: set[str], module: str) -> bool:
    return any(path == module or path.startswith(module + ".") for path in paths)


def _declared(
    graph: fx.Graph, modules: tuple[str, ...] | None, depths: dict[str, int], stem: set[str], block_of: dict[str, int]
) -> tuple[dict[str, int], set[str]] | None:
    """Stages from a declaration: a block belongs to the first declared stage that ends at or after its end.

    Declared stages end where a feature extractor takes their output; a
    block is staged by its last node, so a stage's blocks stay whole even
    where the declared feature is taken inside a block (Xception).  The
    first declared stage is the stem where it holds only the structural
    stem (ResNet's ``act1``, RegNet's ``stem``); otherwise (ConvNeXt's
    ``stages.0``, EfficientNet's ``blocks.0``) the stem before it is stage 0
    and declared stage *i* is stage *i + 1*.  ``None`` when the declaration
    does not fit the graph (a module it names is absent, or stages end out of
    order): the structure decides then.
    """
    if not modules:
        return None
    nodes = list(graph.nodes)
    position = {node.name: i for i, node in enumerate(nodes)}
    paths = [_module_paths(node) for node in nodes]
    ends = []
    for module in modules:
        inside = [i for i, p in enumerate(paths) if _inside(p, module)]
        if not inside or (ends and max(inside) <= ends[-1]):
            return None
        ends.append(max(inside))
    block_end = {}
    for node in nodes:
        block_end[block_of[node.name]] = position[node.name]
    group = {}
    for node in nodes:
        if node.name in depths and node.op != "placeholder":
            end = block_end[block_of[node.name]]
            group[node.name] = next((i for i, e in enumerate(ends) if e >= end), len(ends) - 1)
    first = [name for name, g in group.items() if g == 0]
    stem_group = all(name in stem for name in first)
    if stem_group:
        return group, {name for name in first}
    declared_stem = {name for name in first if name in stem and not _inside(paths[position[name]], modules[0])}
    return {name: 0 if name in declared_stem else g + 1 for name, g in group.items()}, declared_stem


def stage_table(sites: list) -> list[Stage]:
    """One ``Stage`` per stage that holds sites: its resolution and the modules its sites are in.

    The resolution is the smallest output of its sites, leaving out those on
    globally pooled features (squeeze-excitation), so ResNet-50's stage 4 is
    7x7 although ``layer4.0.conv1`` outputs 14x14.  The modules are, per
    site, the shortest module path that no site of another stage shares
    (``layer4``; ``features.13`` .. ``features.16``).
    """
    members: dict[int, list] = {}
    for site in sites:
        members.setdefault(site.stage, []).append(site)
    stages = []
    for index, group in sorted(members.items()):
        sizes = [s.output_size for s in group if s.input_size != (1, 1)] or [s.output_size for s in group]
        resolution = min(sizes, key=lambda size: size[0] * size[1])
        others = {prefix for s in sites if s.stage != index for prefix in _prefixes(s.name)}
        modules = (next((p for p in _prefixes(s.name) if p not in others), s.name) for s in group)
        stages.append(Stage(index, resolution, tuple(dict.fromkeys(modules)), len(group)))
    return stages


def _prefixes(name: str) -> list[str]:
    """``'layer4.0.conv1'`` -> ``['layer4', 'layer4.0', 'layer4.0.conv1']``."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
