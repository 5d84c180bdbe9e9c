"""Verify a rewritten model against its original, whole model and site by site.

Each converted site is checked in isolation: the original model's graph is
run once, recording every site's input and output, and the site's attention
layer is applied to the recorded input.  Per-site errors therefore do not
include the rounding of the sites before it; the whole-model comparison
does.  Both models run in eval mode without autograd; their modes are
restored afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import fx, nn

from tcnn_fx import meta
from tcnn_fx.capture import capture
from tcnn_fx.errors import InvalidInputError, UsageError
from tcnn_fx.leaf_sites import INNER
from tcnn_fx.modes import evaluating
from tcnn_fx.submodule import recorded_inputs, resolve

DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Comparison:
    """Largest absolute and relative (to the reference's largest magnitude) difference of two outputs."""

    name: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclass(frozen=True)
class VerifyReport:
    """Whole-model and per-site comparisons of a rewritten model with its original."""

    output: Comparison
    sites: tuple[Comparison, ...]
    rtol: float
    atol: float

    @property
    def passed(self) -> bool:
        return self.output.passed and all(site.passed for site in self.sites)

    def table(self) -> str:
        rows = [("", "max abs", "max rel", "")]
        for c in (self.output, *self.sites):
            rows.append((c.name, f"{c.max_abs:.3e}", f"{c.max_rel:.3e}", "ok" if c.passed else "FAIL"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.append(f"{'passed' if self.passed else 'FAILED'} (rtol {self.rtol:g}, atol {self.atol:g})")
        return "\n".join(lines)


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> Comparison:
    if actual.shape != expected.shape:
        raise InvalidInputError(f"{name}: output shape {tuple(actual.shape)} differs from {tuple(expected.shape)}")
    difference = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    relative = difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf"))
    return Comparison(name, difference, relative, relative <= rtol or difference <= atol)


def _flatten(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in _flatten(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _flatten(value)]
    return []


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, wanted: set[str]):
        super().__init__(module)
        self.wanted, self.values = wanted, {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node.name in self.wanted:  # a copy: an in-place activation may overwrite the tensor later
            self.values[node.name] = value.clone() if isinstance(value, torch.Tensor) else value
        return value


@contextlib.contextmanager
def _recorded_modules(model: nn.Module, names: list[str]):
    """Record the first input and output of each named submodule while the body runs: ``{name:input: ...}``."""
    values: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            values.setdefault(f"{name}:input", args[0].clone())
            values.setdefault(f"{name}:output", output.clone())

        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        yield values
    finally:
        for handle in handles:
            handle.remove()


def verify(
    original: nn.Module,
    rewritten: nn.Module,
    example_inputs: tuple | None,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    module_inputs: tuple | None = None,
) -> VerifyReport:
    """Compare ``rewritten`` (from ``tcnn_fx.rewrite``) with ``original`` on ``example_inputs``.

    ``rtol`` bounds max|a - b| / max|b| (default by dtype: 1e-5 float32,
    1e-10 float64); an output also passes if its max absolute difference is
    at most ``atol``.  Where ``rewrite`` converted a submodule
    (``module=``), the rewritten submodule is compared with the original's
    on the inputs it receives when ``original`` runs on ``example_inputs``
    (or on ``module_inputs``): a detector's post-processing (NMS) is not
    part of the check.
    """
    path, graph = meta.rewritten_graph(rewritten)
    recipe, compared = meta.recipe(graph), meta.compared_nodes(graph)
    if path:
        if module_inputs is None:
            if example_inputs is None:
                raise UsageError("give the model's example_inputs (or the submodule's module_inputs) to verify")
            module_inputs = recorded_inputs(original, path, example_inputs)
        original, rewritten, example_inputs = resolve(original, path), resolve(rewritten, path), tuple(module_inputs)
    elif example_inputs is None:
        raise UsageError("verify needs example_inputs")
    dtype = example_inputs[0].dtype
    rtol = DEFAULT_RTOL.get(dtype, 1e-5) if rtol is None else rtol
    wanted = {name for pair in compared.values() for name in pair}
    inner = [name for name, pair in compared.items() if pair == (INNER, INNER)]
    with evaluating(original, rewritten), torch.no_grad():
        # The graph rewrite saw: captured with the recipe's leaf modules, so its node names match.
        recorder = _Recorder(capture(original, example_inputs, leaf_modules=recipe.leaf_modules(original)), wanted)
        with _recorded_modules(original, inner) as inner_values:
            expected = _flatten(recorder.run(*example_inputs))
        recorder.values.update(inner_values)
        actual = _flatten(rewritten(*example_inputs))
        if len(actual) != len(expected):
            raise InvalidInputError(f"the models return {len(actual)} and {len(expected)} tensors")
        outputs = [compare("output", a, e, rtol, atol) for a, e in zip(actual, expected)]
        output = max(outputs, key=lambda c: c.max_rel)
        sites = []
        for name, (input_node, output_node) in compared.items():
            if input_node == INNER:
                input_node, output_node = f"{name}:input", f"{name}:output"
            if input_node not in recorder.values or output_node not in recorder.values:
                raise InvalidInputError(
                    f"site '{name}' is not in the original model's graph: was it rewritten from another?"
                )
            layer = rewritten.get_submodule(name)
            site_out = layer(recorder.values[input_node])
            sites.append(compare(name, site_out, recorder.values[output_node], rtol, atol))
    return VerifyReport(output, tuple(sites), rtol, atol)
