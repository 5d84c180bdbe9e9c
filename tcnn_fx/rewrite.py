"""``tcnn_fx.rewrite``: capture, find sites, apply a policy, convert, record.

Data flows one way: capture -> shapes -> sites -> policy plan -> convert ->
(verify).  The user's model is copied first and never touched; any failure
raises before anything is returned, so no half-rewritten model escapes.  The
rewritten graph carries its ``RewriteRecipe`` (how to replay it) and its
``RewriteReport`` (what was done) in ``meta`` (``tcnn_fx.meta``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
from torch import fx, nn

from tcnn_fx import meta
from tcnn_fx.capture import capture
from tcnn_fx.cost import ModelCost
from tcnn_fx.errors import UsageError, VerificationError
from tcnn_fx.layers import ConvAttentionConfig
from tcnn_fx.leaf_sites import INNER, find_leaf_sites
from tcnn_fx.passes.conv_to_attention import Conversion, convert_sites
from tcnn_fx.passes.shape_prop import propagate_shapes
from tcnn_fx.policy import Policy
from tcnn_fx.recipe import RewriteRecipe, RewriteReport, split_leaf_modules
from tcnn_fx.sites import Site, find_sites
from tcnn_fx.specs import file_digest
from tcnn_fx.submodule import recorded_inputs, resolve
from tcnn_fx.verify import verify as verify_models

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


def trace(
    model: nn.Module, example_inputs: tuple, *, config: ConvAttentionConfig | None = None, leaf_modules=()
) -> fx.GraphModule:
    """Capture ``model``, propagate shapes and annotate its sites.

    Every node gets ``meta['val']`` (its output as a meta tensor); every
    convolution node ``meta['tcnn_fx.site']`` (its ``Site``: resolution,
    stage, cost ...); the graph module ``meta['tcnn_fx.sites']`` (all sites in
    graph order, then those inside modules capture kept whole, of kind
    ``'inner'``), ``meta['tcnn_fx.cost']`` (the model's ``ModelCost``) and
    ``meta['tcnn_fx.capture']`` (modules kept whole and why); see
    ``tcnn_fx.meta``.  The graph module shares ``model``'s submodules: copy
    the model first to change it independently.
    """
    graph_module = capture(model, example_inputs, leaf_modules=leaf_modules)
    info = meta.capture_info(graph_module)
    propagate_shapes(graph_module, example_inputs, look_inside=(*info.fallback_leaves, *info.mode_leaves))
    sites = find_sites(graph_module, config)
    nodes = {n.name: n for n in graph_module.graph.nodes}
    for site in sites:
        nodes[site.node].meta[meta.SITE] = site
    sites += find_leaf_sites(graph_module, config)
    graph_module.meta[meta.SITES] = sites
    batch = max(example_inputs[0].shape[0], 1) if example_inputs[0].dim() else 1
    graph_module.meta[meta.COST] = ModelCost(
        flops=graph_module.meta[meta.FLOPS] // batch, params=sum(p.numel() for p in graph_module.parameters())
    )
    return graph_module


def default_inputs(model: nn.Module, example_inputs: tuple | None) -> tuple:
    if example_inputs is not None:
        return example_inputs
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    return (torch.zeros(DEFAULT_INPUT_SHAPE, device=device, dtype=dtype),)


def rewrite(
    model: nn.Module,
    policy: Policy | str | Iterable[str] | dict = "stage4",
    example_inputs: tuple | None = None,
    *,
    module: str | None = None,
    module_inputs: tuple | None = None,
    config: ConvAttentionConfig | None = None,
    fold_norm: bool = False,
    verify: bool = False,
    leaf_modules: Iterable[type | str] = (),
    spec: str | None = None,
    **layer_options,
) -> nn.Module:
    """A copy of ``model`` with the sites ``policy`` chooses replaced by ``ConvAttention2d``.

    ``example_inputs`` fixes the input shape the sites are analysed at
    (default: one 224x224 RGB image); ``layer_options`` are
    ``ConvAttentionConfig`` fields (or pass ``config``).  ``fold_norm`` folds
    eval-mode batch norms into the layers.  ``leaf_modules`` (module classes
    or qualified names) are kept whole by capture, as in ``tcnn_fx.capture``.
    With ``verify`` the result is checked against ``model``
    (``tcnn_fx.verify``) and a mismatch raises ``VerificationError``.
    ``spec`` records how to rebuild the base model (``'torchvision:resnet50'``).

    ``module`` (a dotted path such as ``'backbone.body'``) rewrites only that
    submodule and returns a copy of the whole model with it replaced; its
    inputs are recorded by running the model on ``example_inputs``, or given
    as ``module_inputs``.  Without ``module`` the result is the rewritten
    ``GraphModule`` itself.  ``tcnn_fx.report_of(result)`` is the
    ``RewriteReport``, ``tcnn_fx.recipe_of(result)`` the ``RewriteRecipe``.
    """
    if config is not None and layer_options:
        raise UsageError(f"pass either config or layer options {sorted(layer_options)}, not both")
    known = {f.name for f in dataclasses.fields(ConvAttentionConfig)}
    if set(layer_options) - known:
        raise UsageError(
            f"rewrite got unknown options {sorted(set(layer_options) - known)}; layer options are {sorted(known)} "
            "(policy settings such as include_stem go in a Policy)"
        )
    config = config or ConvAttentionConfig(**layer_options)
    policy = Policy.coerce(policy)
    if module_inputs is not None and module is None:
        raise UsageError("module_inputs are the inputs of the submodule named by module=; pass module too")
    leaf_modules = list(leaf_modules)
    leaf_names, leaf_types = split_leaf_modules(leaf_modules)
    recipe = RewriteRecipe(
        spec=spec, spec_sha256=file_digest(spec) if spec else None, module=module,
        policy=None if policy.where is not None else policy.to_dict(), config=config.to_dict(),
        leaf_names=leaf_names, leaf_types=leaf_types, fold_norm=fold_norm,
    )  # fmt: skip
    work = copy.deepcopy(model)
    if module is None:
        example_inputs = default_inputs(model, example_inputs)
        result = _rewrite_copy(work, policy, example_inputs, config, leaf_modules, recipe)
    else:
        target = resolve(work, module)
        if module_inputs is None:
            module_inputs = recorded_inputs(work, module, default_inputs(model, example_inputs))
        graph_module = _rewrite_copy(target, policy, tuple(module_inputs), config, leaf_modules, recipe)
        work.set_submodule(module, graph_module)
        result = work
    if verify:
        checked = verify_models(model, result, example_inputs, module_inputs=module_inputs)
        if not checked.passed:
            raise VerificationError(f"the rewritten model does not match the original:\n{checked.table()}")
    return result


def _rewrite_copy(
    work: nn.Module,
    policy: Policy,
    example_inputs: tuple,
    config: ConvAttentionConfig,
    leaf_modules: list[type | str],
    recipe: RewriteRecipe,
) -> fx.GraphModule:
    """Capture ``work`` (a copy the caller owns), convert the planned sites and attach recipe and report."""
    graph_module = trace(work, example_inputs, config=config, leaf_modules=leaf_modules)
    graph_module.training = work.training  # submodules keep their own modes; new layers follow the model's
    sites = meta.sites(graph_module)
    cost = meta.model_cost(graph_module)
    plan = policy.plan(sites, cost)
    conversions = convert_sites(graph_module, plan, config, fold_norm=recipe.fold_norm)
    by_name = {site.name: site for site in sites}
    converted = [by_name[c.site] for c in conversions]
    hybrid_cost = cost.hybrid(converted)
    recipe = recipe.replace(
        input_shapes=tuple(tuple(x.shape) for x in example_inputs), input_dtype=str(example_inputs[0].dtype)[6:]
    )
    graph_module.meta[meta.RECIPE] = recipe
    graph_module.meta[meta.COMPARED_NODES] = {c.site: _compared_nodes(by_name[c.site], c) for c in conversions}
    graph_module.meta[meta.REPORT] = RewriteReport(
        converted=tuple(c.site for c in conversions),
        skipped=plan.skipped,
        flops=cost.flops,
        hybrid_flops=hybrid_cost.flops,
        params=cost.params,
        hybrid_params=sum(p.numel() for p in graph_module.parameters()),
        recipe=recipe,
        folded_norms=_folded(conversions),
        notes=tuple(c.note for c in conversions if c.note),
        capture=dict(meta.capture_info(graph_module).fallback_leaves),
    )
    return graph_module


def _compared_nodes(site: Site, conversion: Conversion) -> tuple[str, str]:
    """The original graph's nodes a converted site must reproduce: its input, and its conv (or folded norm).

    A site inside a module kept whole has no nodes: ``(INNER, INNER)``, and
    ``verify`` records its module's input and output with hooks instead.
    """
    if site.kind == INNER:
        return (INNER, INNER)
    return (site.input_node, site.norm_node if conversion.folded_norm else site.node)


def _folded(conversions: list[Conversion]) -> dict[str, str]:
    return {c.site: c.folded_norm for c in conversions if c.folded_norm}
