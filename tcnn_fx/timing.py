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

from tcnn_fx.errors import InvalidInputError


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
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 3,
    rounds: int = 20,
    min_seconds: float = 0.0,
    synchronize: bool = False,
) -> dict[str, Timing]:
    """Time each callable ``rounds`` times, interleaved, after ``warmup`` calls each.

    With ``min_seconds``, rounds go on until the timed calls together took
    that long: a median of a few millisecond-long calls is otherwise at the
    mercy of one passing disturbance (a search once measured a CNN at 1.45x
    itself over 10 rounds of 7 ms).  ``synchronize`` waits for the
    CUDA device after each call, for GPU timing.  Returns the median, the
    fastest and the slowest round per name.
    """
    if rounds < 1 or warmup < 0 or min_seconds < 0:
        raise InvalidInputError(
            f"rounds must be >= 1, warmup and min_seconds >= 0, got rounds={rounds}, warmup={warmup}, "
            f"min_seconds={min_seconds}"
        )

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
    done, elapsed = 0, 0.0
    while fns and (done < rounds or elapsed < min_seconds):
        for name, fn in fns.items():
            samples[name].append(once(fn))
            elapsed += samples[name][-1]
        done += 1
    return {
        name: Timing(statistics.median(values), min(values), max(values), len(values))
        for name, values in samples.items()
    }
