"""Every ``meta`` entry tcnn_fx writes, in one place, with typed accessors.

As torch.fx's own passes do, analyses write what they find into
``graph_module.meta`` and ``node.meta`` and later steps read it; data flows
one way: capture -> shapes -> sites -> rewrite -> verify / save / export.
An accessor whose entry is missing says which step writes it.

Graph module entries:

* ``CAPTURE``: ``CaptureInfo``, the modules capture kept whole and why (``capture``)
* ``DECLARED_STAGES``: stage ends the model declares, e.g. timm's ``feature_info`` (``capture``)
* ``FLOPS``: FLOPs of one forward pass at the traced batch size (``propagate_shapes``)
* ``INNER_CALLS``: the calls of convolutions inside modules kept whole (``propagate_shapes``)
* ``COST``: ``ModelCost``, the model's FLOPs per image and parameters (``trace``)
* ``SITES``: ``list[Site]``, the convolution sites (``trace``)
* ``RECIPE``: ``RewriteRecipe``, how to replay the rewrite (``rewrite``)
* ``REPORT``: ``RewriteReport``, what the rewrite did (``rewrite``)
* ``COMPARED_NODES``: for each converted site, the original graph's nodes it must reproduce (``rewrite``)

Node entries: ``SITE`` (its ``Site``), ``STAGE`` and ``BLOCK`` (``find_sites``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx, nn

from tcnn_fx.errors import InvalidInputError

if TYPE_CHECKING:
    from tcnn_fx.capture import CaptureInfo
    from tcnn_fx.cost import ModelCost
    from tcnn_fx.recipe import RewriteRecipe, RewriteReport
    from tcnn_fx.sites import Site

CAPTURE = "tcnn_fx.capture"
DECLARED_STAGES = "tcnn_fx.declared_stages"
FLOPS = "tcnn_fx.flops"
INNER_CALLS = "tcnn_fx.inner_convolutions"
COST = "tcnn_fx.cost"
SITES = "tcnn_fx.sites"
RECIPE = "tcnn_fx.recipe"
REPORT = "tcnn_fx.report"
COMPARED_NODES = "tcnn_fx.compared_nodes"
SITE = "tcnn_fx.site"
STAGE = "tcnn_fx.stage"
BLOCK = "tcnn_fx.block"

_WRITER = {CAPTURE: "tcnn_fx.capture", COST: "tcnn_fx.trace", SITES: "tcnn_fx.trace", RECIPE: "tcnn_fx.rewrite",
           REPORT: "tcnn_fx.rewrite", COMPARED_NODES: "tcnn_fx.rewrite"}  # fmt: skip


def _entry(graph_module: nn.Module, key: str):
    entries = getattr(graph_module, "meta", None) if isinstance(graph_module, fx.GraphModule) else None
    if not entries or key not in entries:
        raise InvalidInputError(
            f"{type(graph_module).__name__} has no meta['{key}']: it is written by {_WRITER.get(key, 'tcnn_fx')}"
        )
    return entries[key]


def capture_info(graph_module: fx.GraphModule) -> CaptureInfo:
    return _entry(graph_module, CAPTURE)


def sites(graph_module: fx.GraphModule) -> list[Site]:
    return _entry(graph_module, SITES)


def model_cost(graph_module: fx.GraphModule) -> ModelCost:
    return _entry(graph_module, COST)


def recipe(graph_module: fx.GraphModule) -> RewriteRecipe:
    return _entry(graph_module, RECIPE)


def report(graph_module: fx.GraphModule) -> RewriteReport:
    return _entry(graph_module, REPORT)


def compared_nodes(graph_module: fx.GraphModule) -> dict[str, tuple[str, str]]:
    return _entry(graph_module, COMPARED_NODES)


def rewritten_graph(hybrid: nn.Module) -> tuple[str, fx.GraphModule]:
    """Where in ``hybrid`` the graph ``rewrite`` produced is (``''``: ``hybrid`` itself), and that graph."""
    if isinstance(hybrid, fx.GraphModule) and RECIPE in hybrid.meta:
        return "", hybrid
    found = [
        (name, module)
        for name, module in hybrid.named_modules()
        if isinstance(module, fx.GraphModule) and RECIPE in module.meta
    ]
    if not found:
        raise InvalidInputError(f"{type(hybrid).__name__} was not produced by tcnn_fx.rewrite (no recipe attached)")
    if len(found) > 1:
        names = [name for name, _ in found]
        raise InvalidInputError(
            f"{type(hybrid).__name__} holds {len(found)} rewritten submodules {names}; "
            "ask for one: report_of(model.get_submodule(name))"
        )
    return found[0]


def report_of(hybrid: nn.Module) -> RewriteReport:
    """The ``RewriteReport`` of a model ``rewrite`` returned (or of the one rewritten submodule it holds)."""
    return report(rewritten_graph(hybrid)[1])


def recipe_of(hybrid: nn.Module) -> RewriteRecipe:
    """The ``RewriteRecipe`` of a model ``rewrite`` returned: everything needed to replay the rewrite."""
    return recipe(rewritten_graph(hybrid)[1])
