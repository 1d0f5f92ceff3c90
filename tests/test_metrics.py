"""Confusion-matrix metrics against references written here from the definitions, and against torchmetrics."""

from __future__ import annotations

import json
import math
import multiprocessing as mp

import numpy as np
import pytest
import torch

from cskd.errors import DataError
from cskd.evaluation import ConfusionMatrix, SegMetrics
from cskd.evaluation.metrics import spread_counts

IGNORE = 255


def _random_case(seed: int, k: int = 6, shape=(3, 17, 23)) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets with ignore pixels; class k-1 absent everywhere; class k-2 only ever predicted."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k - 2, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.15] = IGNORE
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target, torch.randint(0, k - 1, shape, generator=g))
    pred[pred == IGNORE] = 0
    return pred, target


def _reference(pred: np.ndarray, target: np.ndarray, k: int) -> dict[str, object]:
    """Per-class TP / FP / FN over labelled pixels, in float64, one class at a time."""
    labelled = target != IGNORE
    p, t = pred[labelled].astype(np.int64), target[labelled].astype(np.int64)
    iou, acc, support = [], [], []
    for c in range(k):
        tp = float(np.sum((p == c) & (t == c)))
        fp = float(np.sum((p == c) & (t != c)))
        fn = float(np.sum((p != c) & (t == c)))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else math.nan)
        acc.append(tp / (tp + fn) if tp + fn > 0 else math.nan)
        support.append(tp + fn)
    n = float(len(t))
    present = [u for u in iou if not math.isnan(u)]
    fw = sum(s / n * u for s, u in zip(support, iou) if s > 0)
    return {
        "iou": iou, "acc": acc, "miou": sum(present) / len(present),
        "pixel_acc": float(np.sum(p == t)) / n,
        "mean_acc": float(np.mean([a for a in acc if not math.isnan(a)])),
        "fwiou": fw, "miou_all": sum(0.0 if math.isnan(u) else u for u in iou) / k, "n": int(n),
    }


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_metrics_match_reference_over_batches() -> None:
    k = 6
    cm = ConfusionMatrix(k)
    preds, targets = [], []
    for seed in range(3):
        p, t = _random_case(seed, k)
        cm.update(p.to(torch.uint8), t.to(torch.uint8))  # uint8 as the data loader hands out masks
        preds.append(p.numpy())
        targets.append(t.numpy())
    m = cm.compute()
    ref = _reference(np.concatenate(preds), np.concatenate(targets), k)
    assert all(_close(a, b) for a, b in zip(m.iou, ref["iou"]))
    assert all(_close(a, b) for a, b in zip(m.acc, ref["acc"]))
    for key, rkey in [("miou", "miou"), ("pixel_acc", "pixel_acc"), ("mean_acc", "mean_acc"), ("fwiou", "fwiou"),
                      ("miou_all_classes", "miou_all")]:
        assert _close(getattr(m, key), ref[rkey]), key
    assert m.num_pixels == ref["n"]
    assert sum(map(sum, m.confusion)) == ref["n"]


def test_absent_and_only_predicted_classes() -> None:
    cm = ConfusionMatrix(4)
    target = torch.tensor([[0, 0, 1, IGNORE]])
    pred = torch.tensor([[0, 2, 1, 3]])  # class 2 predicted, never labelled; class 3 only under an ignore pixel
    cm.update(pred, target)
    m = cm.compute()
    assert m.iou[0] == pytest.approx(0.5) and m.iou[1] == 1.0
    assert m.iou[2] == 0.0  # a false positive class counts, with IoU 0
    assert math.isnan(m.iou[3])  # absent from ground truth and (scored) prediction: n/a
    assert m.miou == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m.miou_all_classes == pytest.approx((0.5 + 1.0 + 0.0 + 0.0) / 4)
    assert math.isnan(m.acc[2]) and m.mean_acc == pytest.approx((0.5 + 1.0) / 2)
    assert m.pixel_acc == pytest.approx(2 / 3)
    lines = {ln.split()[0]: ln.split()[1:] for ln in m.table(["a", "b", "c", "d"]).splitlines()[2:6]}
    assert lines["d"] == ["n/a", "n/a"] and lines["c"] == ["0.00", "n/a"] and lines["b"] == ["100.00", "100.00"]


def test_agrees_with_torchmetrics_jaccard() -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    k = 7
    cm = ConfusionMatrix(k)
    preds, targets = [], []
    for seed in range(4):
        p, t = _random_case(10 + seed, k, shape=(2, 31, 19))
        cm.update(p, t)
        preds.append(p)
        targets.append(t)
    p, t = torch.cat(preds), torch.cat(targets)
    m = cm.compute()
    macro = tm.multiclass_jaccard_index(p, t, num_classes=k, ignore_index=IGNORE, average="macro")
    per_class = tm.multiclass_jaccard_index(p, t, num_classes=k, ignore_index=IGNORE, average="none")
    assert m.miou == pytest.approx(float(macro), abs=1e-6)
    for ours, theirs in zip(m.iou, per_class.tolist()):
        # torchmetrics reports 0 (zero_division) where we report n/a; its macro mean skips those classes as we do
        assert (math.isnan(ours) and theirs == 0.0) or ours == pytest.approx(theirs, abs=1e-6)
    assert any(math.isnan(u) for u in m.iou), "the case must contain an absent class"


def test_invalid_values_are_errors() -> None:
    cm = ConfusionMatrix(5)
    with pytest.raises(DataError, match=r"label pixels hold values \[7\]"):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[7, 1]]))
    with pytest.raises(DataError, match=r"predicted pixels hold class ids \[9\]"):
        cm.update(torch.tensor([[9, 1]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    assert cm.compute().num_pixels == 0  # failed updates add nothing
    cm.update(torch.tensor([[200, 1]]), torch.tensor([[IGNORE, 1]]))  # anything goes under an ignore pixel
    assert cm.compute().num_pixels == 1
    with pytest.raises(ValueError, match="collides"):
        ConfusionMatrix(300)


def test_empty_matrix_is_all_nan() -> None:
    m = ConfusionMatrix(3).compute()
    assert math.isnan(m.miou) and math.isnan(m.pixel_acc) and m.num_pixels == 0
    assert "n/a" in m.table()


def test_save_writes_json_csv_markdown(tmp_path) -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1, 1, 0]]), torch.tensor([[0, 1, 0, 0]]))
    m = cm.compute()
    paths = m.save(tmp_path / "out", stem="best_val", class_names=["road", "car", "sky"], extra={"split": "val"})
    data = json.loads(paths["json"].read_text())
    assert data["run"] == {"split": "val"}
    assert data["miou"] == pytest.approx(m.miou)  # fractions, not percent
    assert data["classes"][2] == {"id": 2, "name": "sky", "iou": None, "acc": None}
    assert data["classes"][1]["iou"] == pytest.approx(0.5)
    assert data["confusion"] == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]
    rows = paths["csv"].read_text().splitlines()
    assert rows[0] == "id,class,iou,acc" and rows[3] == "2,sky,," and rows[2].startswith("1,car,0.500000")
    md = paths["md"].read_text()
    assert "| sky | n/a | n/a |" in md and "| car | 50.00 | 100.00 |" in md
    assert f"**{100 * m.miou:.2f}**" in md


def test_from_confusion_roundtrip() -> None:
    mat = torch.tensor([[5, 1], [2, 0]])
    m = SegMetrics.from_confusion(mat)
    assert m.iou == pytest.approx((5 / 8, 0.0))
    assert m.fwiou == pytest.approx(6 / 8 * 5 / 8 + 2 / 8 * 0.0)
    assert "mIoU" in m.summary()


def _reduce_worker(rank: int, init_file: str, queue) -> None:  # runs in a spawned process
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        p, t = _random_case(100 + rank, 4)
        cm = ConfusionMatrix(4)
        cm.update(p, t)
        queue.put((rank, cm.reduce_().mat.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch: 5-15 s on 2 busy cores
def test_reduce_sums_over_ranks(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_reduce_worker, args=(r, str(tmp_path / "store"), queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    expected = ConfusionMatrix(4)
    for rank in range(2):
        expected.update(*_random_case(100 + rank, 4))
    assert results[0] == results[1] == expected.mat.tolist()


def test_sync_free_updates_match_and_check_at_compute() -> None:
    """The accelerator path (fixed-bin scatter, invalid pixels counted on the device) gives the same matrix, and
    raises for invalid values when the metrics are read."""
    eager, deferred = ConfusionMatrix(6), ConfusionMatrix(6, check_each_update=False)
    assert eager.check_each_update and not deferred.check_each_update
    for seed in range(3):
        pred, target = _random_case(seed)
        eager.update(pred, target)
        deferred.update(pred.to(torch.uint8), target.to(torch.uint8))
    assert torch.equal(eager.mat, deferred.mat) and eager.compute().confusion == deferred.compute().confusion
    deferred.update(torch.tensor([[9, 1, 0]]), torch.tensor([[0, 7, IGNORE]]))  # no error yet: no host sync
    deferred.update(torch.tensor([[2, 3, 11]]), torch.tensor([[40, 1, 2]]))
    with pytest.raises(DataError, match=r"2 label pixels hold values from 7 to 40 outside 0..5.*"
                                        r"2 predicted pixels hold class ids from 9 to 11 outside"):
        deferred.compute()
    deferred.reset()
    deferred.update(torch.tensor([[0]]), torch.tensor([[250]]))
    with pytest.raises(DataError, match=r"1 label pixels hold values \[250\] outside"):
        deferred.compute()
    deferred.reset()
    assert deferred.compute().num_pixels == 0


@pytest.mark.parametrize("lanes", [1, 7, 1024, 10_000])
def test_spread_counts_equal_numpys_bincount(lanes: int) -> None:
    """The copies of the bins (neighbouring pixels in different copies) sum to the plain counts, for a skewed index
    whose length is no multiple of the lanes, and for more lanes than elements."""
    rng = np.random.default_rng(lanes)
    index = np.where(rng.random(5003) < 0.9, 17, rng.integers(0, 40, 5003))  # 90 % in one bin, as a flat prediction
    counts = spread_counts(torch.from_numpy(index).to(torch.int32), 40, lanes)
    assert counts.dtype == torch.int64 and counts.tolist() == np.bincount(index, minlength=40).tolist()
    assert spread_counts(torch.zeros(0, dtype=torch.int32), 5, lanes).tolist() == [0] * 5
    many = rng.integers(0, 150 * 150 + 3, 5003)  # ADE20K's bins: fewer copies, the same counts
    assert spread_counts(torch.from_numpy(many), 150 * 150 + 3, lanes).tolist() == np.bincount(
        many, minlength=150 * 150 + 3).tolist()


def test_the_sync_free_path_counts_the_same_with_one_set_of_bins_or_many() -> None:
    pred = torch.full((2, 37, 53), 3)
    pred[:, ::5] = 1  # most pixels predicted as one class
    target = torch.randint(0, 6, (2, 37, 53))
    target[0, :4] = IGNORE
    matrices = []
    for lanes in (1, 1024):
        cm = ConfusionMatrix(6, check_each_update=False)
        cm.lanes = lanes
        cm.update(pred, target)
        matrices.append(cm.mat)
    reference = ConfusionMatrix(6)  # the CPU's bincount path
    reference.update(pred, target)
    assert torch.equal(matrices[0], reference.mat) and torch.equal(matrices[1], reference.mat)
