"""Timing device work: CUDA events around each call on a GPU (device work is asynchronous, so a host clock
would time the launch), the host clock around each call on the CPU; and the environment a measurement records."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

MIN_TIMED = 3
T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere, where work is done when the call returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WaitClock(Generic[T]):
    """An iterator over ``items`` that adds up the host seconds spent waiting for each next item: a loop's wait for
    its data loader. A loop fed faster than it works waits ~0 (the batches are ready); a loop that waits for a
    large share of its time is loader-bound."""

    def __init__(self, items: Iterable[T]) -> None:
        self._items: Iterator[T] = iter(items)
        self.seconds = 0.0

    def __iter__(self) -> WaitClock[T]:
        return self

    def __next__(self) -> T:
        start = time.perf_counter()
        try:
            return next(self._items)
        finally:
            self.seconds += time.perf_counter() - start


def dynamo_timers() -> dict[str, float]:
    """torch.compile's aggregate timers in this process so far (seconds by timed function; nested ones overlap);
    empty where this torch has none (a private API: a missing one reports nothing rather than fail)."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
    except Exception:  # noqa: BLE001
        return {}
    return dict(zip(names, (float(v) for v in values)))


#: The timers :func:`compile_seconds` adds up. A frame's timer holds its tracing and its forward graph's compile;
#: AOTAutograd compiles a backward graph lazily, at its first backward, outside it. Triton benchmarks each
#: kernel's configs at its first run, after the compile.
_COMPILE_TIMERS = {"compile": ("_compile.compile_inner", "backward._backward_impl"),
                   "autotune": ("CachingAutotuner.benchmark_all_configs",)}


def compile_seconds() -> dict[str, float]:
    """Seconds this process spent so far in torch.compile (``compile``: frames and backward graphs) and in Triton's
    first-run autotuning (``autotune``); zeros where torch keeps no timers."""
    timers = dynamo_timers()
    return {k: sum(timers.get(name, 0.0) for name in names) for k, names in _COMPILE_TIMERS.items()}


class PhaseClock:
    """Wall seconds of the consecutive phases of one piece of work (the device synchronised at each boundary, so a
    phase's kernels count in it), and how much of each went to ``counters`` (default :func:`compile_seconds`).
    What a phase spends beyond them is its own work: for a first step, cuDNN's autotuning and the first launches."""

    def __init__(self, device: torch.device | str, counters: Callable[[], dict[str, float]] = compile_seconds) -> None:
        self.device = torch.device(device)
        self.counters = counters
        self.phases: dict[str, dict[str, float]] = {}
        synchronize(self.device)
        self._time, self._counts = time.perf_counter(), counters()

    def mark(self, phase: str) -> None:
        """End ``phase`` now (a repeated name adds up)."""
        synchronize(self.device)
        now, counts = time.perf_counter(), self.counters()
        row = self.phases.setdefault(phase, {"seconds": 0.0, **{k: 0.0 for k in counts}})
        row["seconds"] += now - self._time
        for k, v in counts.items():
            row[k] = row.get(k, 0.0) + v - self._counts.get(k, 0.0)
        self._time, self._counts = now, counts


def describe_phases(phases: dict[str, dict[str, float]]) -> str:
    """``teacher 30.1 s (compile 25.0, autotune 1.2), …`` (counters at zero left out)."""
    parts = []
    for name, row in phases.items():
        inner = ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "seconds" and v >= 0.05)
        parts.append(f"{name} {row['seconds']:.1f} s" + (f" ({inner})" if inner else ""))
    return "; ".join(parts)


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


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """What the numbers were measured on: versions, the CPU, and the GPU when ``device`` is one (default: the first
    GPU if there is one). Recorded by the latency benchmark and by every study's report."""
    import torchvision

    from . import __version__

    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    env: dict[str, Any] = {
        "cskd": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


__all__ = ["MIN_TIMED", "PhaseClock", "WaitClock", "compile_seconds", "cpu_name", "describe_phases",
           "dynamo_timers", "environment", "synchronize", "time_calls"]
