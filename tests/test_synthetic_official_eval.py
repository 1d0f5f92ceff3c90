"""Synthetic trees hold Cityscapes ``*_gtFine_instanceIds.png`` (issue #22 item 7), so the official evaluator runs on
them exactly as shipped: its own command, its default settings (instance-level scores on), no patched arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cskd.data import synthetic
from cskd.data._street import INSTANCE_LABEL_IDS, instance_ids


# The evaluator's own command (its __main__, default arguments). The one shim: cityscapesscripts (2.2, 2.3) calls
# numpy.in1d in its instance-level scoring, which NumPy 2.4 removed; numpy.isin(...).ravel() is what in1d returned.
_RUN_EVALUATOR = """
import runpy, numpy as np
if getattr(np, "in1d", None) is None:
    np.in1d = lambda a, b, **kw: np.isin(a, b, **kw).ravel()
runpy.run_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling", run_name="__main__")
"""


def test_instance_ids_number_each_object_of_a_class_with_instances() -> None:
    lab = np.array([[24, 24, 26, 26, 7], [24, 24, 26, 26, 7]], np.uint8)
    objects = np.array([[5, 5, 2, 9, 0], [8, 8, 2, 9, 3]], np.int32)  # road (7) painted while object 3 was drawn
    got = instance_ids(lab, objects)
    assert got.dtype == np.uint16
    assert got.tolist() == [[24000, 24000, 26000, 26001, 7], [24001, 24001, 26000, 26001, 7]]
    assert set(INSTANCE_LABEL_IDS) == set(range(24, 34))


def test_generated_tree_has_instance_ids_beside_every_label_file(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    synthetic.generate(root, 3, 2, (64, 128), seed=1, workers=1)
    labs = sorted((root / "gtFine").rglob("*_gtFine_labelIds.png"))
    assert len(labs) == 5
    for lab_path in labs:
        inst_path = lab_path.with_name(lab_path.name.replace("_labelIds", "_instanceIds"))
        lab, inst = np.asarray(Image.open(lab_path)), np.asarray(Image.open(inst_path))
        assert inst.dtype == np.uint16 and inst.shape == lab.shape
        np.testing.assert_array_equal(np.where(inst >= 1000, inst // 1000, inst), lab)  # the same classes
        assert not np.isin(inst[inst >= 1000] // 1000, INSTANCE_LABEL_IDS, invert=True).any()
    again = tmp_path / "again"
    synthetic.generate(again, 3, 2, (64, 128), seed=1, workers=2)  # deterministic whatever the worker count
    for p in sorted(root.rglob("*_instanceIds.png")):
        assert p.read_bytes() == (again / p.relative_to(root)).read_bytes()


def test_the_official_evaluator_runs_unchanged_on_a_synthetic_tree(tmp_path: Path) -> None:
    pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    root = tmp_path / "synth"
    synthetic.generate(root, 1, 3, (64, 128), seed=2, workers=1)
    results = tmp_path / "results"
    results.mkdir()
    rng = np.random.default_rng(0)
    for gt in sorted((root / "gtFine" / "val").rglob("*_gtFine_labelIds.png")):
        lab = np.asarray(Image.open(gt))
        pred = np.where(rng.random(lab.shape) < 0.8, lab, 7).astype(np.uint8)  # 20% of pixels called road
        Image.fromarray(pred).save(results / gt.name.replace("_gtFine_labelIds", "_pred"))
    env = {**os.environ, "CITYSCAPES_DATASET": str(root), "CITYSCAPES_RESULTS": str(results),
           "CITYSCAPES_EXPORT_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _RUN_EVALUATOR], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads((tmp_path / "resultPixelLevelSemanticLabeling.json").read_text())
    assert 0.5 < out["averageScoreClasses"] < 1.0
    inst = out["averageScoreInstClasses"]  # instance-weighted scores: computed from the instanceIds files
    assert np.isfinite(inst) and 0.5 < inst < 1.0
    assert np.isfinite(out["classInstScores"]["car"]) and np.isfinite(out["classInstScores"]["person"])
