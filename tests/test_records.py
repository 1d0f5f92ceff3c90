"""log.jsonl is valid JSON (issue #22 item 7): non-finite values are written as null, never as bare NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from cskd.engine.records import RunRecorder, json_line, read_records


def _strict(line: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"bare {name} in JSON")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_values_become_null() -> None:
    rec = {"loss": math.nan, "terms": {"cwd": math.inf, "cskd": 0.5}, "iou": [1.0, -math.inf],
           "t": torch.tensor([float("nan"), 2.0]), "ok": 3}
    out = _strict(json_line(rec))
    assert out == {"loss": None, "terms": {"cwd": None, "cskd": 0.5}, "iou": [1.0, None], "t": [None, 2.0], "ok": 3}


def test_the_recorder_writes_valid_json_lines(tmp_path: Path) -> None:
    r = RunRecorder(tmp_path, enabled=True, total=2, start=0, progress=False, tensorboard=False)
    r.write("train", 1, {"loss": float("nan"), "lr": 0.01})
    r.write("val", 2, {"miou": float("inf")})
    r.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [_strict(line)["kind"] for line in lines] == ["train", "val"]
    assert "NaN" not in lines[0] and "Infinity" not in lines[1]
    assert read_records(tmp_path / "log.jsonl", "train")[0]["loss"] is None
