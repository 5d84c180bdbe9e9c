"""``tcnn_fx.rewrite``: capture, find sites, apply a policy, convert, report.

Data flows one way: capture -> shapes -> sites -> policy plan -> convert ->
(verify).  The user's model is copied first and never touched; any failure
raises before anything is returned, so no half-rewritten model escapes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from tcnn_fx.capture import capture
from tcnn_fx.errors import InvalidInputError, UsageError, VerificationError
from tcnn_fx.layers import ConvAttentionConfig
from tcnn_fx.leaf_sites import INNER, find_leaf_sites
from tcnn_fx.passes.conv_to_attention import Conversion, convert_sites
from tcnn_fx.passes.shape_prop import FLOPS_KEY, propagate_shapes
from tcnn_fx.policy import Policy
from tcnn_fx.sites import Site, find_sites
from tcnn_fx.submodule import recorded_inputs, resolve

REPORT_KEY = "tcnn_fx.report"
DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


@dataclass(frozen=True)
class RewriteReport:
    """What ``rewrite`` did: converted sites, skipped sites with reasons, and the cost ratios (hybrid / CNN)."""

    converted: tuple[str, ...]
    skipped: dict[str, str]
    flops: int
    hybrid_flops: int
    params: int
    hybrid_params: int
    input_shape: tuple[int, ...]
    policy: dict | None
    config: dict
    spec: str | None = None
    fold_norm: bool = False
    site_nodes: dict[str, tuple[str, str]] = field(default_factory=dict)
    folded_norms: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    capture: dict = field(default_factory=dict)
    module: str | None = None
    input_shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def flop_ratio(self) -> float:
        return self.hybrid_flops / self.flops

    @property
    def param_ratio(self) -> float:
        return self.hybrid_params / self.params

    def summary(self) -> str:
        return (
            f"converted {len(self.converted)} sites, skipped {len(self.skipped)}; "
            f"FLOP ratio {self.flop_ratio:.3f}, parameter ratio {self.param_ratio:.3f}"
        )


SITES_KEY = "tcnn_fx.sites"


def trace(
    model: nn.Module, example_inputs: tuple, *, config: ConvAttentionConfig | None = None, leaf_modules=()
) -> fx.GraphModule:
    """Capture ``model``, propagate shapes and annotate its sites.

    Every node gets ``meta['val']`` (its output as a meta tensor); every
    convolution node ``meta['tcnn_fx.site']`` (its ``Site``: resolution,
    stage, cost ...); the graph module ``meta['tcnn_fx.sites']`` (all sites in
    graph order, then those inside modules capture kept whole, of kind
    ``'inner'``) and ``meta['tcnn_fx.capture']`` (modules kept whole and why).
    The graph module shares ``model``'s submodules: copy the model first to
    change it independently.
    """
    graph_module = capture(model, example_inputs, leaf_modules=leaf_modules)
    info = graph_module.meta["tcnn_fx.capture"]
    propagate_shapes(graph_module, example_inputs, look_inside=(*info.fallback_leaves, *info.mode_leaves))
    sites = find_sites(graph_module, config)
    nodes = {n.name: n for n in graph_module.graph.nodes}
    for site in sites:
        nodes[site.node].meta["tcnn_fx.site"] = site
    sites += find_leaf_sites(graph_module, config)
    graph_module.meta[SITES_KEY] = sites
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
    eval-mode batch norms into the layers.  With ``verify`` the result is
    checked against ``model`` (``tcnn_fx.verify``) and a mismatch raises.
    ``spec`` records how to rebuild the base model (``'torchvision:resnet50'``).

    ``module`` (a dotted path such as ``'backbone.body'``) rewrites only that
    submodule and returns a copy of the whole model with it replaced; its
    inputs are recorded by running the model on ``example_inputs``, or given
    as ``module_inputs``.  Without ``module`` the result is the rewritten
    ``GraphModule`` itself.  The ``RewriteReport`` is in the rewritten
    graph's ``meta['tcnn_fx.report']``; ``tcnn_fx.report_of(result)`` finds it.
    """
    if config is not None and layer_options:
        raise UsageError(f"pass either config or layer options {sorted(layer_options)}, not both")
    config = config or ConvAttentionConfig(**layer_options)
    policy = Policy.coerce(policy)
    if module_inputs is not None and module is None:
        raise UsageError("module_inputs are the inputs of the submodule named by module=; pass module too")
    work = copy.deepcopy(model)
    if module is None:
        example_inputs = default_inputs(model, example_inputs)
        result = _rewrite_copy(work, policy, example_inputs, config, fold_norm, leaf_modules, spec, None)
    else:
        target = resolve(work, module)
        if module_inputs is None:
            module_inputs = recorded_inputs(work, module, default_inputs(model, example_inputs))
        graph_module = _rewrite_copy(
            target, policy, tuple(module_inputs), config, fold_norm, leaf_modules, spec, module
        )
        work.set_submodule(module, graph_module)
        result = work
    if verify:
        from tcnn_fx.verify import verify as verify_models

        checked = verify_models(model, result, example_inputs, module_inputs=module_inputs)
        if not checked.passed:
            raise VerificationError(f"the rewritten model does not match the original:\n{checked.table()}")
    return result


def _rewrite_copy(
    work: nn.Module,
    policy: Policy,
    example_inputs: tuple,
    config: ConvAttentionConfig,
    fold_norm: bool,
    leaf_modules: Iterable[type | str],
    spec: str | None,
    module: str | None,
) -> fx.GraphModule:
    """Capture ``work`` (a copy the caller owns), convert the planned sites and attach the report."""
    graph_module = trace(work, example_inputs, config=config, leaf_modules=leaf_modules)
    graph_module.training = work.training  # submodules keep their own modes; new layers follow the model's
    sites = graph_module.meta[SITES_KEY]
    plan = policy.plan(sites)
    flops = graph_module.meta[FLOPS_KEY]
    params = sum(p.numel() for p in graph_module.parameters())
    conversions = convert_sites(graph_module, plan, config, fold_norm=fold_norm)
    batch = example_inputs[0].shape[0]
    by_name = {site.name: site for site in sites}
    extra = sum(by_name[c.site].attention_flops - by_name[c.site].conv_flops for c in conversions) * batch
    capture_info = graph_module.meta.get("tcnn_fx.capture")
    graph_module.meta[REPORT_KEY] = RewriteReport(
        converted=tuple(c.site for c in conversions),
        skipped=plan.skipped,
        flops=flops,
        hybrid_flops=flops + extra,
        params=params,
        hybrid_params=sum(p.numel() for p in graph_module.parameters()),
        input_shape=tuple(example_inputs[0].shape),
        policy=None if policy.where is not None else policy.to_dict(),
        config=config.to_dict(),
        spec=spec,
        fold_norm=fold_norm,
        site_nodes={c.site: _compared_nodes(by_name[c.site], c) for c in conversions},
        folded_norms=_folded(conversions),
        notes=tuple(c.note for c in conversions if c.note),
        capture=dict(capture_info.fallback_leaves) if capture_info else {},
        module=module,
        input_shapes=tuple(tuple(x.shape) for x in example_inputs),
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


def located_report(hybrid: nn.Module) -> tuple[str, RewriteReport]:
    """Where in ``hybrid`` its ``RewriteReport`` is (``''``: ``hybrid`` itself is the rewritten graph), and the report."""
    report = getattr(hybrid, "meta", {}).get(REPORT_KEY) if isinstance(hybrid, fx.GraphModule) else None
    if report is not None:
        return "", report
    found = [
        (name, module.meta[REPORT_KEY])
        for name, module in hybrid.named_modules()
        if isinstance(module, fx.GraphModule) and REPORT_KEY in module.meta
    ]
    if not found:
        raise InvalidInputError(f"{type(hybrid).__name__} was not produced by tcnn_fx.rewrite (no report attached)")
    if len(found) > 1:
        names = [name for name, _ in found]
        raise InvalidInputError(
            f"{type(hybrid).__name__} holds {len(found)} rewritten submodules {names}; "
            "ask for one: report_of(model.get_submodule(name))"
        )
    return found[0]


def report_of(hybrid: nn.Module) -> RewriteReport:
    """The ``RewriteReport`` of a model ``rewrite`` returned (or of the one rewritten submodule it holds)."""
    return located_report(hybrid)[1]
