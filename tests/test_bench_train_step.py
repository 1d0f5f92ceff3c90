"""benchmarks/train_step.py's per-step record: every timed step in order, and the garbage collections meanwhile."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import train_step  # noqa: E402


def test_gc_pauses_records_each_collection_and_detaches():
    with train_step.gc_pauses() as pauses:
        gc.collect()
        gc.collect(0)
    assert len(pauses) == 2 and all(p >= 0 for p in pauses)
    gc.collect()
    assert len(pauses) == 2  # the callback is gone after the block


def test_rows_carry_every_timed_step(tmp_path):
    out = tmp_path / "step.json"
    train_step.main(["--device", "cpu", "--batch", "2", "--size", "32", "64", "--iters", "3", "--warmup", "1",
                     "--methods", "student", "--num-classes", "5", "--dtype", "fp32", "--no-flops",
                     "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert len(row["step_s"]) == 3 and all(t > 0 for t in row["step_s"])
    assert sorted(row["step_s"])[1] == row["median_s"]
    assert row["gc_collections"] >= 0 and row["gc_seconds"] >= 0
    # the runner's first step by phase (a student alone: no teacher phase)
    assert list(row["first_step"]) == ["student and losses", "backward", "optimizer"]


def test_profile_prints_kernels_by_shape_and_the_host_time_per_step(tmp_path, capsys):
    out = tmp_path / "step.json"
    train_step.main(["--device", "cpu", "--batch", "2", "--size", "32", "64", "--iters", "2", "--warmup", "1",
                     "--methods", "student", "--num-classes", "5", "--dtype", "fp32", "--no-flops",
                     "--profile", "student", "--out", str(out)])
    text = capsys.readouterr().out
    shapes = text.split("by operator and input shapes:")[1]
    # the costliest rows are convolutions (which ones depends on the machine), each with its batch-2 input shape
    assert any("convolution" in line and "[[2, " in line for line in shapes.splitlines())
    host_ms = float(text.split("per step: host ")[1].split(" ms")[0])
    assert host_ms > 0
    assert (tmp_path / "step_student_trace.json").stat().st_size > 0


def test_kernel_time_counts_device_kernels_not_the_annotated_ranges_around_them():
    from types import SimpleNamespace as Event

    from torch.autograd import DeviceType

    events = [Event(device_type=DeviceType.CUDA, is_user_annotation=False, self_device_time_total=300.0),
              Event(device_type=DeviceType.CUDA, is_user_annotation=False, self_device_time_total=200.0),
              # a compiled graph's range on the GPU timeline: it spans the two kernels above
              Event(device_type=DeviceType.CUDA, is_user_annotation=True, self_device_time_total=500.0),
              Event(device_type=DeviceType.CPU, is_user_annotation=False, self_device_time_total=0.0)]
    assert train_step.kernel_time_us(events) == 500.0
