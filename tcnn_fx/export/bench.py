"""Side-by-side latency of a CNN and its hybrid, in PyTorch eager and ONNX Runtime.

Every timed callable of one batch size (CNN and hybrid, each runtime) is run
interleaved, round by round, so the ratios compare like with like; the
reported latency is the median.  The ONNX files are exported to a temporary
folder with ``to_onnx`` and checked with ``verify_onnx`` before timing.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.export.lowering import Lowering
from tcnn_fx.export.onnx import _session, to_onnx, verify_onnx
from tcnn_fx.files import atomic_write
from tcnn_fx.layers.conv_attention import ConvAttention2d
from tcnn_fx.meta import report_of
from tcnn_fx.modes import evaluating
from tcnn_fx.timing import time_side_by_side

RUNTIMES = ("torch", "ort")


@dataclass(frozen=True)
class BenchRow:
    """Median latencies (seconds) of the CNN and the hybrid at one batch size on one runtime."""

    batch: int
    runtime: str
    cnn: float
    hybrid: float
    flop_ratio: float

    @property
    def ratio(self) -> float:
        return self.hybrid / self.cnn

    def to_dict(self) -> dict:
        return asdict(self) | {"ratio": self.ratio}


def bench(
    model: nn.Module,
    hybrid: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batches: tuple[int, ...] = (1, 8),
    runtimes: tuple[str, ...] = RUNTIMES,
    provider: str = "CPUExecutionProvider",
    warmup: int = 3,
    rounds: int = 20,
    min_seconds: float = 1.0,
    content_weight: float | None = None,
    lowering: Lowering | None = None,
) -> list[BenchRow]:
    """Time ``model`` and ``hybrid`` (from ``tcnn_fx.rewrite``) at each batch size and runtime.

    ``input_shape`` is one example's shape without the batch, e.g. ``(3, 224, 224)``.
    At least ``rounds`` interleaved rounds, more until the timed calls took
    ``min_seconds`` together (small models take milliseconds per call).
    ``content_weight`` times a copy of the hybrid with every head's content
    weight set to it (``with_content_weight``): a hybrid as converted adds
    nothing through its content branch, and its ONNX file is the CNN's graph;
    a fine-tuned one has opened its gates.  ``lowering`` is passed to ``to_onnx``.
    """
    if content_weight is not None:
        hybrid = with_content_weight(hybrid, content_weight)
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        raise InvalidInputError(f"unknown runtimes {sorted(unknown)}; choose from {RUNTIMES}")
    flop_ratio = report_of(hybrid).flop_ratio
    rows = []
    with evaluating(model, hybrid), tempfile.TemporaryDirectory(prefix="tcnn_fx-bench-") as folder:
        sessions = {}
        if "ort" in runtimes:
            example = (torch.randn(2, *input_shape),)
            for name, module in (("cnn", model), ("hybrid", hybrid)):
                path = to_onnx(module, Path(folder) / f"{name}.onnx", example, lowering=lowering)
                verify_onnx(module, path, example, providers=(provider,))
                sessions[name] = _session(path, provider, spinning=False)
        for batch in batches:
            x = torch.randn(batch, *input_shape)
            fns = {}
            if "torch" in runtimes:
                fns |= {("torch", "cnn"): lambda x=x: model(x), ("torch", "hybrid"): lambda x=x: hybrid(x)}
            for name, session in sessions.items():
                feeds = {session.get_inputs()[0].name: x.numpy()}
                fns[("ort", name)] = lambda s=session, f=feeds: s.run(None, f)
            with torch.no_grad():
                timing = time_side_by_side(fns, warmup=warmup, rounds=rounds, min_seconds=min_seconds)
            for runtime in runtimes:
                rows.append(
                    BenchRow(
                        batch, runtime, timing[(runtime, "cnn")].median, timing[(runtime, "hybrid")].median, flop_ratio
                    )
                )
    return rows


def with_content_weight(hybrid: nn.Module, weight: float) -> nn.Module:
    """A copy of ``hybrid`` with every attention head's content weight set to ``weight``, for timing.

    What a fine-tuned hybrid computes (every head's content branch open),
    without fine-tuning it; the model's outputs change, its cost is that of a
    trained one.  ``weight`` is in [0, 1] (strictly inside for sigmoid gates).
    """
    if not 0.0 <= weight <= 1.0:
        raise InvalidInputError(f"content weight must be in [0, 1], got {weight!r}")
    hybrid = copy.deepcopy(hybrid)
    with torch.no_grad():
        for layer in hybrid.modules():
            if not isinstance(layer, ConvAttention2d):
                continue
            if layer.config.gate == "linear":
                layer.gate.fill_(weight)
            elif 0.0 < weight < 1.0:  # content weight 1 - sigmoid(gate)
                layer.gate.fill_(math.log((1 - weight) / weight))
            else:
                raise InvalidInputError(f"a sigmoid gate cannot give content weight {weight!r}; use 0 < w < 1")
    return hybrid


def plot(rows: list[BenchRow], path: str | Path, title: str = "") -> None:
    """Bar chart of the hybrid / CNN latency ratio per batch size and runtime, with the FLOP ratio as a line."""
    from matplotlib.figure import Figure  # not pyplot: the caller's matplotlib backend is left alone

    batches = sorted({r.batch for r in rows})
    runtimes = sorted({r.runtime for r in rows}, key=RUNTIMES.index)
    width = 0.8 / len(runtimes)
    figure = Figure(figsize=(1.5 + 1.2 * len(batches) * len(runtimes), 3.5))
    axes = figure.add_subplot()
    for i, runtime in enumerate(runtimes):
        ratios = [next(r.ratio for r in rows if r.batch == b and r.runtime == runtime) for b in batches]
        axes.bar([j + i * width for j in range(len(batches))], ratios, width, label=runtime)
    axes.axhline(rows[0].flop_ratio, color="black", linestyle="--", label="FLOP ratio")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xticks([j + width * (len(runtimes) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    axes.set_ylabel("hybrid / CNN latency")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    with atomic_write(path) as temporary:
        figure.savefig(temporary, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
