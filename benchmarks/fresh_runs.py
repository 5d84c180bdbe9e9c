"""Independent runs of a benchmark, each in a fresh plain ``python`` process, and their spread.

A ratio measured interleaved in one process is steady within that process;
between processes it moves with what the shared machine does meanwhile, the
allocator's state and the threads' placement.  So the benchmarks that state
targets repeat their measurement in fresh processes (default settings: the
child inherits the environment as it is, adds nothing) and report the median
of the runs with their range.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

#: The flag a benchmark's ``main`` reads to measure once and print its result as JSON.
ONE_RUN = "--one-run"


def fresh_runs(module: str, arguments: list[str], runs: int) -> list:
    """``python -m module --one-run *arguments``, ``runs`` times in turn; each run's printed JSON.

    A failing child raises with its standard error, so a run's traceback is
    not lost behind a JSON decoding error.
    """
    results = []
    for _ in range(runs):
        child = subprocess.run(
            [sys.executable, "-m", module, ONE_RUN, *arguments], capture_output=True, text=True, check=False
        )
        if child.returncode:
            raise RuntimeError(f"{module} {ONE_RUN} failed (exit {child.returncode}):\n{child.stderr}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return results


def spread(values: list[float], digits: int = 2) -> str:
    """``median (low-high)`` of ``values``: how the project's result tables give several runs."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
