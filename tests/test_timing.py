"""cskd.timing: the phase clock of a first step and the compile counters it reads."""

from __future__ import annotations

import pytest

import cskd.timing as timing
from cskd.timing import PhaseClock, compile_seconds, describe_phases


def test_phase_clock_gives_each_phase_its_wall_time_and_counter_deltas(monkeypatch) -> None:
    clock_times = iter([10.0, 13.5, 14.0, 20.0])
    counts = iter([{"compile": 1.0, "autotune": 0.0}, {"compile": 3.0, "autotune": 0.5},
                   {"compile": 3.0, "autotune": 0.5}, {"compile": 7.0, "autotune": 0.75}])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock_times))
    clock = PhaseClock("cpu", counters=lambda: next(counts))
    clock.mark("teacher")
    clock.mark("backward")
    clock.mark("teacher")  # a repeated phase adds up
    assert clock.phases == {"teacher": {"seconds": 3.5 + 6.0, "compile": 2.0 + 4.0, "autotune": 0.5 + 0.25},
                            "backward": {"seconds": 0.5, "compile": 0.0, "autotune": 0.0}}
    assert describe_phases(clock.phases) == "teacher 9.5 s (compile 6.0, autotune 0.8); backward 0.5 s"


def test_compile_seconds_adds_up_frames_backward_graphs_and_autotuning(monkeypatch) -> None:
    import torch._dynamo.utils as dynamo_utils

    names = ["_compile.compile_inner", "compile_fx_inner", "backward._backward_impl",
             "CachingAutotuner.benchmark_all_configs"]
    monkeypatch.setattr(dynamo_utils, "compile_times", lambda repr, aggregate: (names, ["17.5", "16.0", "2.5", "1.25"]))
    assert compile_seconds() == pytest.approx({"compile": 20.0, "autotune": 1.25})

    def gone(**kwargs):
        raise TypeError("compile_times() got an unexpected keyword argument 'aggregate'")

    monkeypatch.setattr(dynamo_utils, "compile_times", gone)
    assert compile_seconds() == {"compile": 0.0, "autotune": 0.0}  # a torch without the timers: zeros, no failure


def test_a_first_compiled_step_books_its_compile_time_to_the_phase_that_compiled() -> None:
    import torch

    net = torch.compile(torch.nn.Linear(4, 4), backend="eager")  # dynamo's tracing only: fast on any CPU
    clock = PhaseClock("cpu")
    out = net(torch.randn(2, 4))
    clock.mark("forward")
    out.sum().backward()
    clock.mark("backward")
    assert set(clock.phases) == {"forward", "backward"}
    assert clock.phases["forward"]["compile"] > 0  # the frame compiled in the forward phase
    assert 0 <= clock.phases["forward"]["compile"] <= clock.phases["forward"]["seconds"]
