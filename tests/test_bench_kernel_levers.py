"""benchmarks/kernel_levers.py at a CPU size: every lever timed both ways, the fused teacher's difference, the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import kernel_levers  # noqa: E402


def test_kernel_levers_benchmark_on_cpu(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    rc = kernel_levers.main(["--device", "cpu", "--batch", "1", "--size", "32", "64", "--iters", "1", "--warmup", "1",
                             "--teacher", "resnet50", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["lever"], r["variant"].split(" ")[0]) for r in rows] == [
        ("ce", "eager"), ("ce", "compiled"),
        ("teacher", "unfused"), ("teacher", "fused"),
        *[(f"aspp {who}", f"d={d}") for who in ("teacher", "student") for d in (12, 12, 24, 24, 36, 36)],
        ("pool", "compiled"),
        *[("metric", dist) for dist in ("one", "one", "skewed,", "skewed,", "uniform,", "uniform,")]]
    assert all(r["ms"] > 0 for r in rows)
    teacher = rows[3]
    assert teacher["max_abs_diff"] <= 1e-4 * teacher["max_abs_logit"]  # float32 on the CPU: the same function
    for r in rows[5:16:2]:  # each rewrite against the library's op: the same function in float32
        assert r["variant"].endswith("row_taps") and r["max_abs_diff"] <= 1e-5 * r["max_abs_logit"]
    for r in rows[-5::2]:  # many sets of bins against one: the same matrix
        assert r["variant"].endswith("1024 sets of bins") and r["max_abs_diff"] == 0 and r["max_abs_logit"] > 0
    assert json.loads(out.read_text())["failed"] == []
    assert "| teacher | fused (58 convs) |" in capsys.readouterr().out  # 16 blocks × 3 + stem 3 + head 7, no aux


def test_a_failing_lever_is_reported_and_the_others_still_print(tmp_path, capsys, monkeypatch):
    def broken(*_):
        raise RuntimeError("compiler said no\nlong trace")
    monkeypatch.setitem(kernel_levers.LEVERS, "teacher", broken)
    out = tmp_path / "kernels.json"
    rc = kernel_levers.main(["--device", "cpu", "--batch", "1", "--size", "32", "64", "--iters", "1", "--warmup", "1",
                             "--levers", "teacher,ce", "--out", str(out)])
    assert rc == 1
    data = json.loads(out.read_text())
    assert data["failed"] == [{"lever": "teacher", "error": "RuntimeError: compiler said no"}]
    assert [r["lever"] for r in data["rows"]] == ["ce", "ce"]
    assert "| ce | compiled |" in capsys.readouterr().out
