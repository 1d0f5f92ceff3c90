"""``cskd compare``: both budgets' tables and curves; killed and restarted it skips finished runs; a failing
method is reported, not fatal."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cskd.losses.base import DistillLoss, register_loss
from cskd.losses.methods import METHODS, Method


def write_config(tmp: Path, synth_root: Path, iterations: int = 3) -> Path:
    cfg = {
        "name": "toy",
        "data": {"dataset": "synthscapes", "root": str(synth_root), "crop_size": [32, 64], "workers": 0},
        "model": {"model": "deeplabv3", "backbone": "mobilenetv2"},
        "teacher": {"model": "deeplabv3", "backbone": "mobilenetv2"},
        "train": {"budget": {"iterations": iterations, "warmup_steps": 1, "calibration_steps": 2},
                  "batch_size": 3, "log_every": 1, "save_every": 1, "device": "cpu", "amp": "none"},
        "eval": {"max_images": 2},
    }
    path = tmp / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_methods_two_seeds_both_budgets(synth_root: Path, tmp_path: Path) -> None:
    from cskd.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", str(write_config(tmp_path, synth_root)), "--methods", "baseline,kd", "--seeds", "2",
                 "--out", str(out), "--no-progress", "--val-points", "2"]) == 0
    report = (out / "report.md").read_text()
    assert "## Equal iterations (3 per run)" in report and "## Equal training time" in report
    results = json.loads((out / "results.json").read_text())
    time_budget = results["budgets"]["time"]["gpu_seconds"]
    kd_iter = next(r for r in results["budgets"]["iterations"]["rows"] if r["method"] == "kd")
    assert time_budget == pytest.approx(kd_iter["train_seconds"])  # kd's iteration-budget time sets it
    for budget in ("iterations", "time"):
        rows = list(csv.DictReader((out / f"table_{budget}.csv").open()))
        assert [r["method"] for r in rows] == ["baseline", "kd"]
        assert all(int(r["runs"]) == 2 and int(r["failed"]) == 0 for r in rows)
        assert all(0.0 <= float(r["miou_mean"]) <= 1.0 for r in rows)
        for png in (f"miou_vs_time_{budget}.png", f"miou_vs_iterations_{budget}.png"):
            assert (out / png).stat().st_size > 1000
    for r in results["budgets"]["time"]["rows"]:
        assert r["planned_seconds"] is not None and r["iterations"] >= 1
    assert "Environment:" in report and "digest" in report and "torch" in report


@register_loss("_test_compare_nan")
class _AlwaysNaN(DistillLoss):
    def __init__(self, *, student_channels: int, teacher_channels: int, num_classes: int) -> None:
        super().__init__()

    def forward(self, student, teacher, targets=None):  # noqa: ANN001, ANN201
        return {"broken": student.logits.mean() * float("nan")}


def test_a_failing_method_is_reported_and_the_others_go_on(synth_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from cskd.studies import compare

    monkeypatch.setitem(METHODS, "broken", Method("broken", ({"name": "_test_compare_nan"},), "always NaN"))
    plan = compare.plan(write_config(tmp_path, synth_root), ("baseline", "broken"), seeds=1,
                             budgets=("iterations",), out=tmp_path / "cmp")
    report = compare.run(plan, progress=False).read_text()
    assert "| broken |" in report and "failed" in report and "non-finite loss" in report
    assert "| baseline |" in report and "| failed |" not in report.split("| baseline |")[1].split("\n")[0]


def test_killed_comparison_resumes_and_skips_finished_runs(synth_root: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, synth_root, iterations=6)
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "cskd", "compare", str(cfg), "--methods", "baseline,kd", "--seeds", "1",
           "--budget", "iterations", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "iterations" / "baseline" / "seed0"
    deadline = time.time() + 300
    while not (first / "metrics.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in first.iterdir()}
    assert not (out / "report.md").exists()

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert {p: p.stat().st_mtime_ns for p in first.iterdir()} == finished  # not retrained
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "| kd |" in report


def test_a_run_folder_of_another_config_is_refused(synth_root: Path, tmp_path: Path) -> None:
    from cskd.studies import compare
    from cskd.errors import ConfigError

    cfg = write_config(tmp_path, synth_root, iterations=2)
    compare.run(compare.plan(cfg, ("baseline",), seeds=1, budgets=("iterations",), out=tmp_path / "c"),
                progress=False)
    plan = compare.plan(cfg, ("baseline",), seeds=1, budgets=("iterations",), out=tmp_path / "c",
                             overrides=("train.lr=0.05",))
    with pytest.raises(ConfigError, match="different configuration"):
        compare.run(plan, progress=False)


def test_set_on_a_methods_terms_reaches_compares_runs(synth_root: Path, tmp_path: Path) -> None:
    """``cskd compare --set losses.N.key=value``: compare rebuilds each run's losses from the method's name; the
    override is applied to each method that has a term N (issue #22 item 4 for compare)."""
    from cskd.studies import compare

    cfg = write_config(tmp_path, synth_root)
    plan = compare.plan(cfg, ("baseline", "kd", "cskd"), seeds=1, budgets=("iterations",),
                             out=tmp_path / "out", overrides=("losses.1.lambda_cam=0.5", "train.lr=0.02"))
    runs = {m: compare.run_config(plan, "iterations", m, 0, None) for m in plan.methods}
    assert [lc.params.get("lambda_cam") for lc in runs["cskd"].losses][1] == 0.5
    assert runs["cskd"].train.lr == 0.02 and runs["kd"].train.lr == 0.02
    assert [lc.name for lc in runs["kd"].losses] == [lc["name"] for lc in METHODS["kd"].losses]  # one term: untouched
    assert runs["baseline"].losses == [] or not runs["baseline"].losses


def test_results_json_writes_null_for_non_finite(tmp_path: Path) -> None:
    from cskd.engine.records import dumps

    text = dumps({"miou": float("nan"), "delta": [1.0, float("inf")], "path": tmp_path}, indent=2)
    assert json.loads(text) == {"miou": None, "delta": [1.0, None], "path": str(tmp_path)}
