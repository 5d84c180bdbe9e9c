"""What a (fine-tuned) hybrid's attention layers do: gates and attention distances, per converted layer.

The T-CNN paper explains its gains by what fine-tuning does to the converted
layers: how much each head's gate has opened to content attention, and how
far its attention reaches (the mean attention distance, ConViT's measure of
non-locality).  At conversion every gate is closed (content weight 0) and
each head attends to one kernel tap, at distance |tap offset|.

A head applies ``(1 - w) * positional + w * content``.  For ``w`` in [0, 1]
that is a mixture of two attention maps and its mean distance lies between
theirs; the exact parameterisation's gate is unbounded, though, and
fine-tuning drives some ``w`` negative: the applied map then has signed mass
and its mass-weighted offset (``distance``) is not a distance.  The table and
the plot therefore report each branch's distance and the weight, never that
signed mix as a distance.
"""

from __future__ import annotations

import os
import re
import textwrap
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.layers import ConvAttention2d
from tcnn_fx.modes import evaluating

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class LayerAttention:
    """One converted layer: per-head content weights and mean attention distances (pixels)."""

    name: str
    resolution: tuple[int, int]
    content_weight: list[float]
    distance: list[float]  # mass-weighted offset of the applied mix: a distance only if mix_is_distance
    positional_distance: list[float]
    content_distance: list[float]

    @property
    def mean_content_weight(self) -> float:
        return _mean(self.content_weight)

    @property
    def mean_distance(self) -> float:
        return _mean(self.distance)

    @property
    def mean_positional_distance(self) -> float:
        return _mean(self.positional_distance)

    @property
    def mean_content_distance(self) -> float:
        return _mean(self.content_distance)

    @property
    def mix_is_distance(self) -> bool:
        """Whether every head's applied map is a mixture (``w`` in [0, 1]), so that ``distance`` is a distance."""
        return all(0 <= w <= 1 for w in self.content_weight)

    def to_dict(self) -> dict:
        return asdict(self) | {"mean_content_weight": self.mean_content_weight, "mean_distance": self.mean_distance,
                               "mix_is_distance": self.mix_is_distance}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> LayerAttention:
        """A layer back from ``to_dict`` (the JSON of ``tcnn-fx analyze``); the derived entries are recomputed."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if k == "resolution" else v for k, v in data.items() if k in names})


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def analyze_attention(model: nn.Module, images: Tensor, *, chunk: int = 32) -> list[LayerAttention]:
    """Gates and attention distances of every ``ConvAttention2d`` in ``model`` on ``images``.

    Distances are averaged over the images, processed ``chunk`` at a time so
    that the maps of large layers stay small.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ConvAttention2d)}
    if not layers:
        raise InvalidInputError(
            f"{type(model).__name__} has no ConvAttention2d layer: convert it with tcnn_fx.rewrite first"
        )
    inputs: dict[str, Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda _, args, name=name: inputs.__setitem__(name, args[0]))
             for name, layer in layers.items()]  # fmt: skip
    sums = {name: {k: 0.0 for k in ("combined", "positional", "content")} for name in layers}
    sizes: dict[str, tuple[int, int]] = {}
    try:
        with evaluating(model), torch.no_grad():
            for batch in images.split(chunk):
                model(batch)
                for name, layer in layers.items():
                    maps = layer.attention(inputs[name])
                    sizes[name] = maps.output_size
                    for which in sums[name]:
                        sums[name][which] = sums[name][which] + maps.mean_distance(which).double() * len(batch)
    finally:
        for hook in hooks:
            hook.remove()
    count = len(images)
    return [
        LayerAttention(
            name=name, resolution=sizes[name], content_weight=layer.content_weight().detach().double().tolist(),
            distance=(sums[name]["combined"] / count).tolist(),
            positional_distance=(sums[name]["positional"] / count).tolist(),
            content_distance=(sums[name]["content"] / count).tolist(),
        )
        for name, layer in layers.items()
    ]  # fmt: skip


def table(rows: list[LayerAttention]) -> str:
    """One line per layer: content weights, and the mean distance of each branch and (where it is one) of the mix."""
    lines = [
        (
            "layer                      res    heads  content weight: mean      min      max"
            "  mean distance (px): positional  content  applied"
        )
    ]
    for r in rows:
        applied = f"{r.mean_distance:>7.3f}" if r.mix_is_distance else f"{'-':>7}"
        lines.append(
            f"{r.name:<26} {r.resolution[0]:>2}x{r.resolution[1]:<2}  {len(r.content_weight):>5}  "
            f"{r.mean_content_weight:>20.4f} {min(r.content_weight):>8.4f} {max(r.content_weight):>8.4f}  "
            f"{r.mean_positional_distance:>30.3f} {r.mean_content_distance:>8.3f}  {applied}"
        )
    if not all(r.mix_is_distance for r in rows):
        lines.append(
            "applied -: a content weight w of the layer is outside [0, 1], so the applied map (1 - w) * positional"
            " + w * content has signed mass and its mean offset is not a distance (the JSON keeps it as 'distance')"
        )
    return "\n".join(lines)


#: Checkpoint files whose name says less than the folder they are in (``runs/resnet20-hybrid-seed0/model.pt``).
_GENERIC_CHECKPOINTS = {"model", "last", "best", "checkpoint", "weights"}
_CHECKPOINT_SUFFIXES = {".pt", ".pth", ".th", ".ckpt"}


def _without_paths(text: str) -> str:
    """``text`` with every filesystem path in it shortened to a name: a title never shows where a file lay."""

    def name(match: re.Match) -> str:
        token = match.group()
        if "/" not in token and os.sep not in token:
            return token
        path = PurePath(token.replace(os.sep, "/"))
        if path.suffix in _CHECKPOINT_SUFFIXES:
            return path.parent.name if path.stem in _GENERIC_CHECKPOINTS and path.parent.name else path.stem
        return path.name or token.strip("/")

    return re.sub(r"\S+", name, text)


def _policy_words(policy: str | dict) -> str:
    """A policy (its selection string, or the dict a rewrite records of it) in a few words."""
    if isinstance(policy, str):
        return policy
    select, sites = policy.get("select") or "", list(policy.get("sites") or ())
    named = ", ".join(sites) if len(sites) <= 3 else f"{len(sites)} named sites"
    return " + ".join(part for part in (select, named) if part) or "none"


def figure_title(model: str, policy: str | dict | None = None, images: int | None = None) -> str:
    """A plot's title from the model (its spec), the conversion policy and the number of images measured.

    ``policy`` is a policy string or the dict a rewrite records of it
    (``{'select': ..., 'sites': [...]}``); a path in ``model`` (a spec that
    names a file, or a checkpoint) is shortened to a name.
    """
    where = f"{_without_paths(model)}, policy {_policy_words(policy)}" if policy else _without_paths(model)
    measured = f" on {images} images" if images else ""
    return f"{where}: attention of the converted layers{measured}"


def _limits(values: list[float], *, pad: float = 0.08, least_span: float = 0.05) -> tuple[float, float]:
    """Axis limits holding every value and 0, with a margin."""
    low, high = min(0.0, *values), max(0.0, *values)
    margin = pad * max(high - low, least_span)
    return low - margin, high + margin


def _caption(rows: list[LayerAttention]) -> str:
    weights = [(w, r.name) for r in rows for w in r.content_weight]
    (low, low_layer), (high, high_layer) = min(weights), max(weights)
    spread = (
        f"every w is {low:.3f}" if low == high else f"w runs from {low:.3f} ({low_layer}) to {high:.3f} ({high_layer})"
    )
    outside = [f"{n} have w {side}" for n, side in ((sum(w < 0 for w, _ in weights), "< 0"),
                                                     (sum(w > 1 for w, _ in weights), "> 1")) if n]  # fmt: skip
    mix = (
        f"Of the {len(weights)} heads, {' and '.join(outside)}: their applied maps have signed mass, so no mean "
        "distance of the applied mix is drawn (the JSON's 'distance' is that signed offset)."
        if outside
        else "Every w is in [0, 1]: the applied mix is a mixture of the two, its mean distance dashed in black."
    )
    left = (
        "Left: each head's content weight w (dots) and the mean over a layer's heads (line). A head applies "
        f"(1 - w) * positional + w * content attention; w = 0, as at conversion, is the convolution itself. Here {spread}."
    )
    right = (
        "Right: mean attention distance in pixels (ConViT's measure, weighted by attention mass over queries and "
        "images) of each branch alone: positional (the kernel taps' attention) and content (query-key softmax)."
    )
    return "\n".join(textwrap.fill(paragraph, 190) for paragraph in (left, right, mix))


def plot(
    rows: list[LayerAttention],
    path: str | Path,
    title: str = "",
    *,
    model: str | None = None,
    policy: str | dict | None = None,
    images: int | None = None,
) -> Figure:
    """Per layer: each head's content weight (left) and each branch's mean attention distance (right).

    Titled ``figure_title(model, policy, images)`` when ``model`` is given,
    else ``title`` with any filesystem path in it shortened to a name.  Both
    panels are scaled to hold every value (and 0); the applied mix's distance
    is drawn only where it is one (every ``w`` in [0, 1]).  A caption under
    the panels says what is shown.  Writes a PNG to ``path`` and returns the
    figure.
    """
    from matplotlib.figure import Figure  # not pyplot: no backend is chosen or changed for the caller

    if not rows:
        raise InvalidInputError("nothing to plot: no converted layer")
    figure = Figure(figsize=(12, 4.6), layout="constrained")
    gates, distances = figure.subplots(1, 2)
    positions = list(range(len(rows)))
    gates.axhline(0, color="black", linewidth=0.8, label="w = 0: the convolution")
    for i, r in enumerate(rows):
        gates.scatter([i] * len(r.content_weight), r.content_weight, s=14, alpha=0.6, color="tab:blue",
                      label="a head" if i == 0 else None)  # fmt: skip
    gates.plot(positions, [r.mean_content_weight for r in rows], color="tab:blue", label="mean over heads")
    gates.set(ylim=_limits([w for r in rows for w in r.content_weight]), ylabel="content weight w",
              title="content weight per head")  # fmt: skip
    branches = (("positional", "positional_distance", "tab:green", -0.12),
                ("content", "content_distance", "tab:orange", 0.12))  # fmt: skip
    for label, field, colour, shift in branches:
        for i, r in enumerate(rows):
            values = getattr(r, field)
            distances.scatter([i + shift] * len(values), values, s=14, alpha=0.6, color=colour)
        distances.plot([i + shift for i in positions], [_mean(getattr(r, field)) for r in rows], color=colour,
                       marker="o", markersize=3, label=f"{label} branch: heads (dots), mean (line)")  # fmt: skip
    shown = [d for r in rows for d in (*r.positional_distance, *r.content_distance)]
    if all(r.mix_is_distance for r in rows):
        distances.plot(positions, [r.mean_distance for r in rows], "k--", label="applied mix: mean")
        shown += [d for r in rows for d in r.distance]
    distances.set(ylim=_limits(shown), ylabel="mean attention distance (pixels)",
                  title="mean attention distance of each branch")  # fmt: skip
    for axis in (gates, distances):
        axis.set_xlim(-0.5, len(rows) - 0.5)
        axis.set_xticks(positions, [r.name for r in rows], rotation=60, ha="right", fontsize=7)
        axis.set_xlabel("converted layer")
        axis.legend(fontsize=7)
    if model:
        title = figure_title(model, policy, images)
    figure.suptitle(_without_paths(title) or "attention of the converted layers")
    figure.text(0.01, 0, _caption(rows), ha="left", va="top", fontsize=8)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return figure
