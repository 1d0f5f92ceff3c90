"""benchmarks/conv_levers.py at a CPU size: the shapes it finds, both levers timed, the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import conv_levers  # noqa: E402


def test_shapes_are_counted_per_forward():
    from cskd.models.segmentor import build_segmentor

    net = build_segmentor("deeplabv3", "resnet18", num_classes=5)
    shapes = conv_levers.conv_shapes(net, 1, (64, 64))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    # every conv runs once per forward except those the eval forward skips (the aux head's)
    assert sum(shapes.values()) == len(convs) - sum(isinstance(m, nn.Conv2d) for m in net.aux_head.modules())
    dilated = {s: n for (s, kind), n in shapes.items() if kind == "dilated"}
    assert {s.dilation for s in dilated} == {2, 4, 12, 24, 36}
    assert all(s.h == 8 and s.w == 8 for s in dilated)  # the 1/8 map of 64×64


def test_conv_levers_benchmark_on_cpu(tmp_path, capsys):
    out = tmp_path / "levers.json"
    # an R18 teacher: its 1×1 shapes are ASPP's and the projection's only (the CPU's FP8 GEMM takes ~0.25 s a call)
    rc = conv_levers.main(["--device", "cpu", "--batch", "1", "--size", "32", "64", "--iters", "1", "--warmup", "1",
                           "--teacher", "deeplabv3", "resnet18", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    kinds = {(r["role"], r["kind"]) for r in res["rows"]}
    assert ("student", "dilated") in kinds and ("teacher", "dilated") in kinds
    if hasattr(torch, "float8_e4m3fn"):
        assert ("teacher", "1x1") in kinds
    for r in res["rows"]:
        assert all(v > 0 for k, v in r.items() if k.endswith("_ms"))
    assert "Σ ms per step" in capsys.readouterr().out
    assert res["meta"]["batch"] == 1 and res["meta"]["size"] == [32, 64]
