"""A frozen network's forward replayed as a CUDA graph, one per input shape (``train.teacher_graph``).

The distillation teacher runs the same forward, on inputs of one shape, at every step, and never trains: the
textbook case for a CUDA graph. Launched from Python (compiled or not), its ~150 kernels cost the host more than a
millisecond per step, and the CSKD step's host barely keeps ahead of its GPU (docs/benchmarks.md §8); one replay
costs a few microseconds. Unlike torch.compile's "reduce-overhead" mode this needs no compiler: the graph records
whatever the forward launches (inductor's kernels, cuDNN's fused convolutions, an eager module's kernels), so it
also serves a teacher that is only partly compiled.

What a replay returns lives in the graph's own memory and is overwritten by the next replay of the same graph:
copy what must outlive it (the runner clones the teacher's outputs at once, as it must anyway: inference tensors
may not be saved for backward).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_input: Tensor
    output: Any


class GraphedForward:
    """``fn(x, **kwargs)`` (a frozen module's forward), replayed from a CUDA graph captured at the first call with
    each (shape, strides, dtype, device, kwargs, autocast and grad state) of ``x``; each capture runs ``warmup``
    ordinary calls first (torch.compile's compilation, cuDNN's and Triton's autotuning may not run inside a
    capture). Beyond ``max_graphs`` keys, and for inputs off CUDA, under a dispatch mode (a FLOP counter sees the
    ops of an ordinary call) or inside another capture, it calls ``fn`` directly. A capture that fails (an op
    that cannot be captured) costs one warning, and every later call is an ordinary one.

    ``fn`` must be a pure function of ``x`` and of state that does not change between calls (frozen weights):
    a replay reruns the recorded kernels on the new input and nothing else."""

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 2, max_graphs: int = 4, name: str = "the forward") -> None:
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.name = name
        self.failed: str | None = None
        """Why a capture failed (after which every call is an ordinary one), or None."""
        self._graphs: dict[tuple[Any, ...], _Captured] = {}

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _key(self, x: Tensor, kwargs: dict[str, Any]) -> tuple[Any, ...]:
        dev = x.device.type
        return (tuple(x.shape), x.stride(), x.dtype, x.device, tuple(sorted(kwargs.items())),
                torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev), torch.is_grad_enabled(),
                torch.is_inference_mode_enabled())

    def _graphable(self, x: Tensor) -> bool:
        return (x.is_cuda and not torch._C._len_torch_dispatch_stack()
                and not torch.cuda.is_current_stream_capturing())

    def __call__(self, x: Tensor, **kwargs: Any) -> Any:
        if self.failed is not None or not self._graphable(x):
            return self.fn(x, **kwargs)
        key = self._key(x, kwargs)
        captured = self._graphs.get(key)
        if captured is None:
            if len(self._graphs) >= self.max_graphs:
                return self.fn(x, **kwargs)
            static = self._warm_up(x, kwargs)
            try:
                captured = self._capture(static, kwargs)
            except Exception as e:  # noqa: BLE001 - a forward that cannot be captured still runs, without a graph
                self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
                warnings.warn(f"CUDA graph: capturing {self.name} failed ({self.failed}); it runs without a graph "
                              "from now on", RuntimeWarning, stacklevel=2)
                return self.fn(x, **kwargs)
            self._graphs[key] = captured
        else:
            captured.static_input.copy_(x)
        captured.graph.replay()
        return captured.output

    def _warm_up(self, x: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The static input of a new graph, holding ``x``, after ``warmup`` ordinary calls on it (their errors are
        the forward's own and propagate)."""
        static = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static.copy_(x)
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(static, **kwargs)
        current.wait_stream(side)
        return static

    def _capture(self, static: Tensor, kwargs: dict[str, Any]) -> _Captured:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pinning thread may call CUDA while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = self.fn(static, **kwargs)
        return _Captured(graph, static, output)


__all__ = ["GraphedForward"]
