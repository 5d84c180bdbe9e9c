"""What a (fine-tuned) hybrid's attention layers do: gates and attention distances, per converted layer.

The T-CNN paper explains its gains by what fine-tuning does to the converted
layers: how much each head's gate has opened to content attention, and how
far its attention reaches (the mean attention distance, ConViT's measure of
non-locality).  At conversion every gate is closed (content weight 0) and
each head attends to one kernel tap, at distance |tap offset|.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.layers import ConvAttention2d
from tcnn_fx.modes import evaluating


@dataclass(frozen=True)
class LayerAttention:
    """One converted layer: per-head content weights and mean attention distances (pixels)."""

    name: str
    resolution: tuple[int, int]
    content_weight: list[float]
    distance: list[float]  # of the attention the layer applies
    positional_distance: list[float]
    content_distance: list[float]

    @property
    def mean_content_weight(self) -> float:
        return sum(self.content_weight) / len(self.content_weight)

    @property
    def mean_distance(self) -> float:
        return sum(self.distance) / len(self.distance)

    def to_dict(self) -> dict:
        return asdict(self) | {"mean_content_weight": self.mean_content_weight, "mean_distance": self.mean_distance}


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
    lines = [
        "layer                      res    heads  content weight (mean, max)  distance: applied  positional  content"
    ]
    for r in rows:
        lines.append(
            f"{r.name:<26} {r.resolution[0]:>2}x{r.resolution[1]:<2}  {len(r.content_weight):>5}  "
            f"{r.mean_content_weight:>14.4f} {max(r.content_weight):>8.4f}  "
            f"{r.mean_distance:>17.3f}  {sum(r.positional_distance) / len(r.positional_distance):>10.3f}  "
            f"{sum(r.content_distance) / len(r.content_distance):>7.3f}"
        )
    return "\n".join(lines)


def plot(rows: list[LayerAttention], path: str | Path, title: str = "") -> None:
    """Per layer: each head's content weight (left) and mean attention distance (right), means as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (gates, distances) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    positions = range(len(rows))
    for i, r in enumerate(rows):
        gates.scatter([i] * len(r.content_weight), r.content_weight, s=12, alpha=0.6, color="tab:blue")
        distances.scatter([i] * len(r.distance), r.distance, s=12, alpha=0.6, color="tab:orange")
    gates.plot(positions, [r.mean_content_weight for r in rows], color="tab:blue", label="mean over heads")
    distances.plot(positions, [r.mean_distance for r in rows], color="tab:orange", label="applied attention")
    distances.plot(positions, [sum(r.positional_distance) / len(r.positional_distance) for r in rows],
                   color="grey", linestyle="--", label="positional part alone")  # fmt: skip
    gates.set(
        ylabel="content weight per head",
        ylim=(-0.02, max(0.05, *(max(r.content_weight) for r in rows)) * 1.1),
    )
    distances.set(ylabel="mean attention distance (pixels)")
    for axis in (gates, distances):
        axis.set_xticks(list(positions), [r.name for r in rows], rotation=60, ha="right", fontsize=7)
        axis.legend(fontsize=8)
    figure.suptitle(title or "attention of the converted layers")
    figure.savefig(path, dpi=120)
    plt.close(figure)
