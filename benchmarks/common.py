"""Shared helpers of the benchmarks: timing, memory readings and result lines."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def time_median(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs, and all times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeat: int = 3, warmup: int = 1
) -> dict[str, tuple[float, list[float]]]:
    """Like :func:`time_median` for several functions, run in turn within each repetition so that
    a slow spell of a shared machine hits all of them alike. Returns ``{name: (median, times)}``."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), t) for name, t in times.items()}


def rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_times(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.3f}" for t in times) + "] s"


def ratio_line(name: str, value: float, target: str, met: bool) -> str:
    """``ratio <name>: 3.21x (target: ...) OK|MISSED``."""
    return f"ratio {name}: {value:.3g} (target: {target}) {'OK' if met else 'MISSED'}"


def environment() -> str:
    """One line: torch version, threads, device."""
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu, {os.cpu_count()} cores visible"
    )
