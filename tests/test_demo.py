"""The main job, end to end at a tiny size: data, teacher, students, report with a numeric table and pictures."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from cskd.cli import main


def test_demo_runs_end_to_end_and_reports(tmp_path: Path) -> None:
    out, data = tmp_path / "demo", tmp_path / "data"
    # Two iterations per run (the preset's own 6 / 4 only add steps and checkpoints): one validation, a best.pt
    # and a last.pt per run are all that the report and the rerun check below need.
    args = ["demo", "--preset", "tiny", "--out", str(out), "--data-root", str(data), "--device", "cpu",
            "--no-progress", "--teacher-iterations", "2", "--student-iterations", "2"]
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


def test_paper_preset_does_not_compile_unless_asked(tmp_path: Path) -> None:
    from cskd.studies import demo

    plan = demo.plan("paper", out=tmp_path, device="cuda")
    runs = [plan.teacher, *(cfg for cfgs in plan.students.values() for _, cfg in cfgs)]
    assert all(cfg.train.compile is False for cfg in runs)
    plan = demo.plan("paper", out=tmp_path, device="cuda", compile=True)
    assert plan.teacher.train.compile is True
    assert demo.plan("small", out=tmp_path, device="cpu").teacher.train.compile is None  # the engine decides
