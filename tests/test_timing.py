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
