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
        ("teacher", "unfused"), ("teacher", "fused")]
    assert all(r["ms"] > 0 for r in rows)
    assert rows[-1]["max_abs_diff"] <= 1e-4 * rows[-1]["max_abs_logit"]  # float32 on the CPU: the same function
    assert "| teacher | fused (58 convs) |" in capsys.readouterr().out  # 16 blocks × 3 + stem 3 + head 7, no aux
