"""Timing helpers shared by the benchmark scripts: median wall time after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["median_seconds", "sync", "verdict"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], *, device: torch.device, warmup: int = 2, repeat: int = 9) -> float:
    """Median of ``repeat`` timed calls after ``warmup`` untimed ones (compilation, page faults)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def verdict(value: float, target: float | None, *, at_most: bool = False) -> str:
    """A row's verdict against a ``>= target`` goal (``at_most``: a ``<= target`` one, e.g. bytes),
    computed from the measurement ("-" when the row has no target)."""
    if target is None:
        return "-"
    ok, sign = (value <= target, "<=") if at_most else (value >= target, ">=")
    return f"{'pass' if ok else 'FAIL'} ({sign} {target:.2f})"
