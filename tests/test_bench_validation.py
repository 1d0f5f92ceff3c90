"""benchmarks/validation.py at a CPU size: the Trainer's own validation, timed over rounds, the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import validation  # noqa: E402


def test_validation_benchmark_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's pretrained/ file is not here: random weights
    out = tmp_path / "val.json"
    rc = validation.main(["--device", "cpu", "--data", str(tmp_path / "cs"), "--images", "3", "--size", "32", "64",
                          "--rounds", "2", "--set", "data.workers=1", "--profile", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "random weights instead" in text and "round 2:" in text
    assert "Self CPU" in text and "profiled round, per image: wall_ms_per_image" in text  # the last round's table
    res = json.loads(out.read_text())
    assert res["images"] == 3 and res["workers"] == 1 and len(res["rounds"]) == 2
    for r in res["rounds"]:
        assert r["images"] == 3 and r["seconds"] >= r["first_batch_seconds"] > 0 and r["images_per_second"] > 0
        assert 0 <= r["loader_wait_seconds"] <= r["seconds"] - r["first_batch_seconds"]
    assert res["profile"]["wall_ms_per_image"] > 0 and "kernel_ms_per_image" not in res["profile"]  # no CUDA here
    assert len(list((tmp_path / "cs" / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))) == 3
