"""benchmarks/train_loop.py at a CPU size: synthetic Cityscapes-layout PNGs, the distill config through the
Trainer, windows, the step benchmark of the same runner, the ratio, the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import train_loop  # noqa: E402


def test_train_loop_benchmark_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's pretrained/ files are not here: random weights
    out = tmp_path / "loop.json"
    rc = train_loop.main([
        "--device", "cpu", "--data", str(tmp_path / "cs"), "--images", "4", "--size", "64", "128",
        "--iterations", "3", "--window", "1", "--step-warmup", "1", "--step-iters", "2", "--out", str(out),
        "--set", "data.crop_size=[32,64]", "--set", "train.batch_size=3", "--set", "data.workers=0",
        "--set", "teacher.backbone=resnet18",  # a smaller teacher: the test's time, not the config's path
        "--cprofile", str(tmp_path / "fit.prof.txt"),
    ])
    assert rc == 0
    text = capsys.readouterr().out
    assert "teacher.weights: pretrained/deeplabv3_resnet101_citys_best_model.pth not found; random weights" in text
    assert "model.pretrained_base: pretrained/resnet18-imagenet.pth not found; random weights" in text
    assert "loop/step" in text
    res = json.loads(out.read_text())
    assert res["iterations"] == 3 and res["batch"] == 3 and res["crop"] == [32, 64]
    # the first step is untimed (the Trainer's warm-up), so the window ending there has no time: windows 1-2, 2-3
    assert [(w["from"], w["to"]) for w in res["windows"]] == [(1, 2), (2, 3)]
    assert all(w["img_per_s"] > 0 and 0 <= w["data_wait_share"] <= 1 for w in res["windows"])
    assert 0 <= res["data_wait_s"] and res["data_wait_share"] <= 1 and "waiting for data" in text
    # the profile of the run: the Trainer's fit and its first step are in it, by cumulative and by own time
    prof = (tmp_path / "fit.prof.txt").read_text()
    assert prof.count("Ordered by: cumulative time") == 1 and prof.count("Ordered by: internal time") == 1
    assert "(fit)" in prof and "(step)" in prof
    assert isinstance(res["compile_timers"], dict)  # eager on the CPU: no timers, an empty table
    # the first step by phase: each phase's wall time, within the start-up (which also holds the set-up)
    phases = res["first_step_phases"]
    assert list(phases) == ["teacher", "student and losses", "backward", "optimizer"]
    assert all(row["seconds"] >= 0 and set(row) == {"seconds", "compile", "autotune"} for row in phases.values())
    assert sum(row["seconds"] for row in phases.values()) <= res["startup_s"]
    assert "first step by phase: teacher" in text
    assert res["step_img_per_s"] > 0 and abs(res["ratio"] - res["loop_img_per_s"] / res["step_img_per_s"]) < 1e-9
    # the generated tree is in the Cityscapes layout that the config's dataset reads
    assert len(list((tmp_path / "cs" / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))) == 4
    assert len(list((tmp_path / "cs" / "gtFine" / "train").rglob("*_gtFine_labelIds.png"))) == 4


def test_compile_phases_reads_dynamos_aggregate_timers(monkeypatch):
    import torch._dynamo.utils as dynamo_utils

    # the timers of a small module's compiled forward + backward on the CPU (torch 2.14): inductor's time exceeds
    # the frame's, because the backward graph compiles at the first backward, outside the frame's timer
    names = ["_compile.compile_inner", "bytecode_tracing", "compile_fx_inner", "async_compile.wait",
             "backward._backward_impl", "gc"]
    monkeypatch.setattr(dynamo_utils, "compile_times",
                        lambda repr, aggregate: (names, ["17.49", "0.21", "17.58", "2.88", "1.72", "0.1"]))
    phases = train_loop.compile_phases()
    assert phases == pytest.approx({"total": 19.21, "frames": 17.49, "backward_graphs": 1.72, "dynamo_tracing": 0.21,
                                    "inductor": 17.58, "kernel_builds_wait": 2.88})
    assert phases["total"] >= phases["inductor"]  # the parts never exceed the whole
    monkeypatch.setattr(dynamo_utils, "compile_times",  # no backward compiled (an inference-only run)
                        lambda repr, aggregate: (names[:4], ["7.5", "1.25", "5.0", "2.0"]))
    assert train_loop.compile_phases() == {"total": 7.5, "frames": 7.5, "dynamo_tracing": 1.25, "inductor": 5.0,
                                           "kernel_builds_wait": 2.0}

    def gone(**kwargs):
        raise TypeError("compile_times() got an unexpected keyword argument 'aggregate'")

    monkeypatch.setattr(dynamo_utils, "compile_times", gone)
    assert train_loop.compile_phases() == {}  # a torch without these timers: nothing reported, no failure


def test_compile_timers_lists_dynamos_timers_largest_first(monkeypatch):
    import torch._dynamo.utils as dynamo_utils

    names = ["gc", "compile_fx_inner", "_compile.compile_inner", "bytecode_tracing"]
    monkeypatch.setattr(dynamo_utils, "compile_times", lambda repr, aggregate: (names, ["0.1", "17.58", "17.49", "0.2"]))
    assert list(train_loop.compile_timers(top=3).items()) == [
        ("compile_fx_inner", 17.58), ("_compile.compile_inner", 17.49), ("bytecode_tracing", 0.2)]
