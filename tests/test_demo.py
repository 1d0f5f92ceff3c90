"""The main job, end to end at a tiny size: data, teacher, students, report with a numeric table and pictures."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from cskd.cli import main


def test_demo_runs_end_to_end_and_reports(tmp_path: Path) -> None:
    out, data = tmp_path / "demo", tmp_path / "data"
    args = ["demo", "--preset", "tiny", "--out", str(out), "--data-root", str(data), "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "small preset" in report or "tiny preset" in report
    rows = [line for line in report.splitlines() if line.startswith("| DeepLabV3")]
    assert len(rows) == 3  # teacher, baseline, cskd
    for row in rows:
        assert re.search(r"\| \d+\.\d\d \|", row), row  # a numeric mIoU in every row
    assert re.search(r"\| cskd \| \d+\.\d\d \| [+-]\d+\.\d\d \|", report)  # Δ against the baseline
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert len(pngs) == 2
    for name in pngs:
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.width > 100 and im.height > 50
    assert (out / "results.json").exists()

    # Again: everything is found finished, nothing is retrained.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")} == before


def test_demo_jobs_trains_student_runs_in_parallel_processes_with_the_same_results(tmp_path: Path) -> None:
    data = tmp_path / "data"
    common = ["demo", "--preset", "tiny", "--data-root", str(data), "--device", "cpu", "--no-progress",
              "--methods", "baseline", "--seeds", "2"]
    assert main([*common, "--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    report = (tmp_path / "par" / "report.md").read_text()
    assert "2 student runs at a time shared the device" in report
    assert re.search(r"\| DeepLabV3-MobileNetV2 \| baseline \| \d+\.\d\d ± \d+\.\d\d \|", report)  # two seeds
    # Side by side, cuDNN autotuning is off (its timings would contend); a later sequential command takes those
    # runs as its own rather than calling them a different configuration.
    saved = (tmp_path / "par" / "DeepLabV3-MobileNetV2" / "baseline" / "seed0" / "config.yaml").read_text()
    assert "cudnn_benchmark: false" in saved
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "par").rglob("last.pt")}
    assert main([*common, "--out", str(tmp_path / "par")]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "par").rglob("last.pt")} == before
    assert main([*common, "--out", str(tmp_path / "seq")]) == 0
    # The same runs (seed, data order, initialisation): equal first losses. Not bit-equal beyond: each job process
    # gets half the CPU threads, which changes the order of float sums in the convolutions.
    for seed in (0, 1):
        first = []
        for out in ("par", "seq"):
            log = tmp_path / out / "DeepLabV3-MobileNetV2" / "baseline" / f"seed{seed}" / "log.jsonl"
            first.append(next(r["loss"] for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "train"))
        assert abs(first[0] - first[1]) <= 1e-4 * abs(first[1]), (seed, first)


def test_paper_preset_does_not_compile_unless_asked(tmp_path: Path) -> None:
    from cskd import demo

    plan = demo.plan("paper", out=tmp_path, device="cuda")
    runs = [plan.teacher, *(cfg for cfgs in plan.students.values() for _, cfg in cfgs)]
    assert all(cfg.train.compile is False for cfg in runs)
    plan = demo.plan("paper", out=tmp_path, device="cuda", compile=True)
    assert plan.teacher.train.compile is True
    assert demo.plan("small", out=tmp_path, device="cpu").teacher.train.compile is None  # the engine decides
