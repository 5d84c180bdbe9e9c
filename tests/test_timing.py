"""Side-by-side timing and FLOP counting."""

import time

import pytest
import torch

from tcnn_fx.timing import count_flops, time_side_by_side


def test_flops_count_matrix_products():
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    assert count_flops(lambda: a @ b) == 2 * 4 * 5 * 6


def test_interleaved_timing_orders_slow_and_fast():
    calls = []
    fns = {"slow": lambda: (calls.append("slow"), time.sleep(0.004)), "fast": lambda: calls.append("fast")}
    timing = time_side_by_side(fns, warmup=1, rounds=5)
    assert timing["slow"].median > timing["fast"].median
    assert timing["slow"].low <= timing["slow"].median <= timing["slow"].high
    assert calls[2:6] == ["slow", "fast", "slow", "fast"]  # rounds alternate after the warm-up
    assert timing["fast"].rounds == 5


def test_bad_round_counts():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        time_side_by_side({"x": lambda: None}, rounds=0)


def test_min_seconds_adds_rounds_until_the_calls_took_that_long():
    fns = {"sleep": lambda: time.sleep(0.002), "nothing": lambda: None}
    timing = time_side_by_side(fns, warmup=0, rounds=3, min_seconds=0.05)
    assert timing["sleep"].rounds == timing["nothing"].rounds  # still interleaved, round by round
    assert 3 < timing["sleep"].rounds <= 26  # 0.05 s of 2 ms sleeps, not 3 rounds and not thousands


def test_no_callables_no_timings():
    assert time_side_by_side({}, min_seconds=1.0) == {}
