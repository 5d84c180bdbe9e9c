"""The transform: replace planned convolution sites by ``ConvAttention2d``.

Works on a ``GraphModule`` in place (``tcnn_fx.rewrite`` hands it a copy).  A
site's convolution node, and what feeds it that the site absorbed (a zero pad,
the convolution module's own padding or identity children), become one
``call_module`` node to a ``ConvAttention2d`` installed at the
site's qualified name, so the new layer's ``weight`` and ``bias`` keep the
convolution's state-dict keys.  Optionally an eval-mode batch norm after the
convolution is folded into the layer's weights.  A convolution inside a module
capture kept whole (``tcnn_fx.leaf_sites``) is replaced as a module object: the
graph does not change, the enclosing module's code calls the new layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from tcnn_fx import meta
from tcnn_fx.errors import InvalidInputError
from tcnn_fx.layers import ConvAttention2d, ConvAttentionConfig
from tcnn_fx.leaf_sites import INNER
from tcnn_fx.policy import Plan
from tcnn_fx.sites import Site


def _foldable(norm: nn.Module | None) -> bool:
    """A batch norm with running statistics and an affine transform, in eval mode (or frozen)."""
    if norm is None or getattr(norm, "running_var", None) is None or getattr(norm, "weight", None) is None:
        return False
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return not norm.training
    return type(norm).__name__ == "FrozenBatchNorm2d"  # torchvision's and timm's


@dataclass(frozen=True)
class Conversion:
    """What the pass did to one site."""

    site: str
    folded_norm: str | None = None
    note: str | None = None


def _weights(
    graph_module: fx.GraphModule, site: Site, nodes: dict[str, fx.Node]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    conv = nodes[site.node]
    if site.kind == "module":
        module = graph_module.get_submodule(conv.target)
        return module.weight, module.bias
    weight = graph_module.get_parameter(conv.args[1].target)
    bias_node = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
    return weight, (graph_module.get_parameter(bias_node.target) if bias_node is not None else None)


def _check_owner(graph_module: fx.GraphModule, site: Site, nodes: dict[str, fx.Node]) -> None:
    """A functional site's layer replaces the module owning its weight: nothing else may use that module.

    The site's own nodes may: the weight and bias reads, and the padding or
    identity children the module calls before its convolution (absorbed).
    """
    if site.kind in ("module", INNER):
        return
    conv = nodes[site.node]
    own = {a.name for a in conv.all_input_nodes if a.op == "get_attr"} | set(site.absorbed)
    for node in graph_module.graph.nodes:
        target = str(node.target)
        if node.op in ("get_attr", "call_module") and (target == site.name or target.startswith(site.name + ".")):
            if node.name not in own:
                raise InvalidInputError(
                    f"site '{site.name}': node '{node.name}' also uses module '{site.name}', so it cannot be "
                    "replaced by the attention layer"
                )


def _fold_norm(layer: ConvAttention2d, norm: nn.Module) -> None:
    """Fold an eval-mode batch norm into the layer's projection weight and bias."""
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        shift = norm.bias - norm.running_mean * scale
        layer.weight.mul_(scale.reshape(-1, 1, 1, 1))
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.clone())
        else:
            layer.bias.copy_(layer.bias * scale + shift)


def convert_sites(
    graph_module: fx.GraphModule, plan: Plan, config: ConvAttentionConfig | None = None, *, fold_norm: bool = False
) -> list[Conversion]:
    """Replace every site of ``plan`` in ``graph_module`` (in place) and return what was done per site."""
    nodes = {n.name: n for n in graph_module.graph.nodes}
    for site in plan.selected:
        _check_owner(graph_module, site, nodes)
    conversions = []
    for site in plan.selected:
        if site.kind == INNER:
            conversions.append(_replace_inner(graph_module, site, config, fold_norm))
            continue
        conv = nodes[site.node]
        weight, bias = _weights(graph_module, site, nodes)
        # The convolution is discarded with the graph's copy of the model: its tensors become the layer's.
        layer = ConvAttention2d.from_weights(site.geometry, weight, bias, config, adopt=True)
        layer.train(graph_module.training)
        source = conv.args[0]  # read now: a site converted before this one may have replaced the input
        while source.name in site.absorbed:
            source = source.args[0]
        out, folded, note = conv, None, None
        if fold_norm and site.norm_node:
            norm_node = nodes[site.norm_node]
            norm = graph_module.get_submodule(norm_node.target) if norm_node.op == "call_module" else None
            if _foldable(norm):
                _fold_norm(layer, norm)
                out, folded = norm_node, norm_node.target
            else:
                note = f"norm '{site.norm_node}' ({site.norm_type}) kept: only eval-mode batch norms are folded"
        _install(graph_module, site.name, layer)
        with graph_module.graph.inserting_before(conv):
            replacement = graph_module.graph.call_module(site.name, (source,))
        replacement.meta.update(out.meta)
        replacement.meta[meta.SITE] = site
        out.replace_all_uses_with(replacement)
        for name in (site.norm_node if folded else None, site.node, *site.absorbed):
            if name is not None and not nodes[name].users:
                graph_module.graph.erase_node(nodes[name])
        conversions.append(Conversion(site.name, folded, note))
    graph_module.graph.eliminate_dead_code()
    graph_module.delete_all_unused_submodules()
    graph_module.graph.lint()
    graph_module.recompile()
    return conversions


def _replace_inner(
    graph_module: fx.GraphModule, site: Site, config: ConvAttentionConfig | None, fold_norm: bool
) -> Conversion:
    """A convolution inside a module kept whole: the module object is replaced, its caller's code unchanged."""
    conv = graph_module.get_submodule(site.name)
    layer = ConvAttention2d.from_weights(site.geometry, conv.weight, conv.bias, config, adopt=True)
    layer.train(conv.training)
    _install(graph_module, site.name, layer)
    note = f"'{site.name}': its norm is not folded (it is inside a module kept whole)" if fold_norm else None
    return Conversion(site.name, None, note)


def _install(graph_module: fx.GraphModule, path: str, layer: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = graph_module.get_submodule(parent_path) if parent_path else graph_module
    if hasattr(parent, name):
        delattr(parent, name)
    parent.add_module(name, layer)
