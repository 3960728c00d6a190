"""Shared plumbing of the ``micrography bench ...`` commands: timing, machine facts, JSON reports.

Speed and memory targets live in benchmarks, never in tests: every bench
prints a table and writes the same figures as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def time_calls(function: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``function`` after ``warmup`` untimed calls.

    Parameters
    ----------
    function : callable
        Called with no arguments.
    repeats : int
        Timed calls.
    warmup : int
        Untimed calls first (imports, caches, allocator warm-up).

    Returns
    -------
    list of float
        Seconds per timed call.
    """
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def summarise(seconds: list[float]) -> dict[str, float]:
    """Median, minimum and maximum of a list of timings, in seconds."""
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
    }


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, megabytes (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, minimum and maximum of a benchmark figure over seeds.

    Examples
    --------
    >>> mean_spread([1.0, 2.0, 3.0])
    {'mean': 2.0, 'std': 1.0, 'min': 1.0, 'max': 3.0}
    """
    return {
        "mean": float(statistics.fmean(values)),
        "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0,
        "min": float(min(values)),
        "max": float(max(values)),
    }


def machine_info() -> dict[str, Any]:
    """Facts about the machine a benchmark ran on (for comparing figures fairly)."""
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_report(report: dict[str, Any], path: str | Path | None) -> None:
    """Write a benchmark report as indented JSON (no-op when ``path`` is None).

    Parameters
    ----------
    report : dict
        JSON-serialisable figures.
    path : str or pathlib.Path or None
        Destination; parent folders are created.
    """
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
