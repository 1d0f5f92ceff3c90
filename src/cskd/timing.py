"""Timing device work: CUDA events around each call on a GPU (device work is asynchronous, so a host clock
would time the launch), the host clock around each call on the CPU."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MIN_TIMED = 3


def time_calls(
    fn: Callable[[], Any], *, warmup: int, iters: int, cuda: bool, time_budget_s: float | None = None
) -> tuple[list[float], float]:
    """Milliseconds of each timed call of ``fn``, and seconds of the first warm-up call. Warm-up after the first
    call stops early once it has used half of ``time_budget_s``."""
    first = 0.0
    warm_start = 0.0
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - t0
            warm_start = time.perf_counter()
        elif time_budget_s is not None and time.perf_counter() - warm_start > time_budget_s / 2:
            break
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(iters):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        if time_budget_s is not None and len(times) >= MIN_TIMED and time.perf_counter() - start > time_budget_s:
            break
    return times, first


def cpu_name() -> str:
    """The processor's model name (``platform.processor()`` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


__all__ = ["MIN_TIMED", "cpu_name", "time_calls"]
