"""Side-by-side latency and FLOP measurement.

Latency targets in this project are ratios (attention layer / convolution,
hybrid / CNN), so both sides are timed in one run, interleaved round by round:
a machine that slows down part-way through slows both alike.  FLOPs come from
``torch.utils.flop_counter``, which counts matrix products and convolutions
(softmax and element-wise work are not counted).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Timing:
    """Median and spread of one callable's wall-clock latency, in seconds."""

    median: float
    low: float
    high: float
    rounds: int


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-accumulate) of one call of ``fn``, as ``torch.utils.flop_counter`` counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_side_by_side(
    fns: Mapping[str, Callable[[], object]], *, warmup: int = 3, rounds: int = 20, synchronize: bool = False
) -> dict[str, Timing]:
    """Time each callable ``rounds`` times, interleaved, after ``warmup`` calls each.

    ``synchronize`` waits for the CUDA device after each call, for GPU timing.
    Returns the median, the fastest and the slowest round per name.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")

    def once(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        if synchronize:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():
        for _ in range(warmup):
            once(fn)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(once(fn))
    return {
        name: Timing(statistics.median(values), min(values), max(values), rounds) for name, values in samples.items()
    }
