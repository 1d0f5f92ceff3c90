"""Prediction pictures, Cityscapes submission files (checked with the official evaluator when installed) and
``cskd predict``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cskd.data
from cskd.cli import main
from cskd.data.cityscapes_labels import ID_TO_TRAIN_ID, LABELS
from cskd.errors import DataError
from cskd.evaluation import ConfusionMatrix
from cskd.models import build_segmentor
from cskd.outputs import (
    blend,
    cityscapes_key,
    colorize,
    default_palette,
    make_panel,
    submission_filename,
    write_submission,
)

PALETTE = ((10, 20, 30), (200, 0, 0), (0, 150, 250))


def _mask(seed: int = 0, h: int = 6, w: int = 9, k: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.integers(0, k, (h, w)).astype(np.uint8)
    m[rng.random((h, w)) < 0.2] = 255
    return m


# ------------------------------------------------------------------------------------------------ maps


def test_colorize_keeps_ids_and_attaches_the_palette() -> None:
    m = _mask()
    for given in (m, torch.from_numpy(m.astype(np.int64))):
        img = colorize(given, PALETTE)
        assert img.mode == "P" and img.size == (9, 6)
        np.testing.assert_array_equal(np.asarray(img), m)
        pal = img.getpalette()
        assert [tuple(pal[3 * i:3 * i + 3]) for i in range(3)] == list(PALETTE)
        assert pal[3 * 255:3 * 256] == [0, 0, 0]  # ignore is black
        rgb = np.asarray(img.convert("RGB"))
        assert tuple(rgb[m == 1][0]) == PALETTE[1] and (rgb[m == 255] == 0).all()


def test_blend_mixes_labelled_pixels_only() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (6, 9, 3)).astype(np.uint8)
    m = _mask()
    out = np.asarray(blend(image, m, PALETTE, alpha=0.25)).astype(np.float64)
    colors = np.array(PALETTE, dtype=np.float64)
    for y, x in np.ndindex(6, 9):
        if m[y, x] == 255:
            assert (out[y, x] == image[y, x]).all()
        else:
            expected = np.rint(0.75 * image[y, x] + 0.25 * colors[m[y, x]])
            assert (out[y, x] == expected).all()
    chw = torch.from_numpy(image).permute(2, 0, 1)
    np.testing.assert_array_equal(np.asarray(blend(chw, m, PALETTE, alpha=0.25)), out.astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(blend(image, m, PALETTE, alpha=0.0)), image)
    with pytest.raises(ValueError, match="alpha"):
        blend(image, m, PALETTE, alpha=1.5)
    with pytest.raises(ValueError, match="size"):
        blend(image, m[:5], PALETTE)


def test_make_panel_places_tiles_side_by_side() -> None:
    a = np.full((20, 30, 3), 50, np.uint8)
    b = colorize(np.ones((20, 40), np.uint8), PALETTE)
    c = np.full((10, 10, 3), 200, np.uint8)  # half height: scaled to 20×20
    panel = make_panel([a, b, c], ["image", "a title far too long for its tile", ""], gap=4)
    title_h = panel.height - 20
    assert panel.width == 30 + 40 + 20 + 2 * 4 and title_h > 0
    px = np.asarray(panel)
    assert (px[title_h:, :30] == 50).all()
    assert (px[title_h:, 34:74] == PALETTE[1]).all()
    assert (px[title_h:, 78:] == 200).all()
    assert (px[:title_h, 34:74] != 255).any()  # the long title is drawn...
    assert (px[:title_h, 74:] == 255).all()  # ...shortened to stay above its own tile
    assert make_panel([a]).size == (30, 20)


def test_default_palette_is_distinct_and_never_black() -> None:
    pal = default_palette(150)
    assert len(set(pal)) == 150 and (0, 0, 0) not in pal


# ------------------------------------------------------------------------------------------------ Cityscapes


def test_cityscapes_names() -> None:
    for name in ("berlin_000000_000019", "berlin_000000_000019_leftImg8bit", "berlin_000000_000019_leftImg8bit.png",
                 "/data/test/berlin/berlin_000000_000019_leftImg8bit.png"):
        assert cityscapes_key(name) == "berlin_000000_000019"
    assert submission_filename("bad-honnef_000000_000019") == "bad-honnef_000000_000019_leftImg8bit.png"
    for bad in ("photo", "berlin_0_19", "berlin_000000_0000190"):
        with pytest.raises(DataError, match="Cityscapes image name"):
            cityscapes_key(bad)


def test_write_submission_maps_train_ids_to_label_ids(tmp_path) -> None:
    train_to_id = {lb.train_id: lb.id for lb in LABELS if lb.train_id != 255}
    pred = np.arange(19 * 4, dtype=np.uint8).reshape(4, 19) % 19
    pred[0, 0] = 255
    path = write_submission(torch.from_numpy(pred), "munich_000001_000002", tmp_path)
    assert path == tmp_path / "munich_000001_000002_leftImg8bit.png"
    img = Image.open(path)
    assert img.mode == "L" and img.size == (19, 4)
    got = np.asarray(img)
    assert got[0, 0] == 0  # no prediction → "unlabeled"
    assert all(got[y, x] == train_to_id[int(pred[y, x])] for y, x in np.ndindex(4, 19) if (y, x) != (0, 0))
    with pytest.raises(DataError, match="19"):
        write_submission(np.full((2, 2), 19, np.uint8), "munich_000001_000002", tmp_path)


def test_official_evaluator_gives_our_class_ious(tmp_path, monkeypatch) -> None:
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    rng = np.random.default_rng(7)
    label_ids = np.array([lb.id for lb in LABELS if lb.id != 31])  # "train" (train id 16) absent everywhere
    gt_dir, res_dir = tmp_path / "gtFine" / "val" / "bonn", tmp_path / "results"
    gt_dir.mkdir(parents=True)
    cm = ConfusionMatrix(19)
    gts = []
    for i in range(3):
        name = f"bonn_{i:06d}_000019"
        gt = rng.choice(label_ids, size=(24, 40)).astype(np.uint8)  # evaluated and void ids alike
        target = ID_TO_TRAIN_ID[gt]
        noise = rng.choice([t for t in range(19) if t not in (16, 17)], size=gt.shape)  # 17: never predicted
        pred = np.where((rng.random(gt.shape) < 0.5) & (target != 255), target, noise).astype(np.uint8)
        pred[pred == 255] = 0
        pred[(pred == 16) | (pred == 17)] = 0
        Image.fromarray(gt).save(gt_dir / f"{name}_gtFine_labelIds.png")
        write_submission(pred, name, res_dir)
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        gts.append(str(gt_dir / f"{name}_gtFine_labelIds.png"))
    ours = cm.compute()

    for key, value in {"evalInstLevelScore": False, "JSONOutput": False, "quiet": True,
                       "predictionPath": str(res_dir), "predictionWalk": None}.items():
        monkeypatch.setattr(ev.args, key, value)
    preds = [ev.getPrediction(ev.args, gt) for gt in gts]
    result = ev.evaluateImgLists(preds, gts, ev.args)
    names = [lb.name for lb in sorted((lb for lb in LABELS if lb.train_id != 255), key=lambda lb: lb.train_id)]
    theirs = [result["classScores"][n] for n in names]
    assert np.isnan(theirs[16]) and np.isnan(ours.iou[16])  # absent class: n/a for both
    assert ours.iou[17] == theirs[17] == 0.0  # in the ground truth, never predicted
    np.testing.assert_allclose(np.array(ours.iou), np.array(theirs), rtol=1e-12, atol=1e-12)
    assert 0.1 < ours.miou < 0.9
    assert result["averageScoreClasses"] == pytest.approx(ours.miou, abs=1e-12)


# ------------------------------------------------------------------------------------------------ cskd predict


def _calibrated_net() -> torch.nn.Module:
    """A 19-class model whose BatchNorm statistics come from data: its predictions vary over the image (with the
    initial statistics a random network predicts one class everywhere, and its activations decay into slow
    denormal floats)."""
    torch.manual_seed(0)
    net = build_segmentor("deeplabv3", "mobilenetv2", 19)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.randn(4, 3, 32, 64))
    return net.eval()


@pytest.fixture
def checkpoint(tmp_path):
    net = _calibrated_net()
    path = tmp_path / "student.pth"
    torch.save({"model": net.state_dict(), "spec": net.spec.to_dict(), "config": {},
                "dataset": {"name": "cityscapes", "num_classes": 19, "class_names": [str(i) for i in range(19)],
                            "palette": [[i * 12, 255 - i * 12, 7] for i in range(19)]}}, path)
    return path


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for rel in ("berlin_000000_000019_leftImg8bit.png", "sub/bonn_000001_000002_leftImg8bit.jpg"):
        Image.fromarray(rng.integers(0, 256, (32, 64, 3)).astype(np.uint8)).save(folder / rel)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _predict(*args: str) -> int:
    return main(["predict", *args, "--device", "cpu", "--workers", "0", "--no-progress"])


def test_predict_palette_folder_and_no_overwrite(checkpoint, images, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert _predict(str(checkpoint), str(images), "--out", str(out)) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["berlin_000000_000019_leftImg8bit.png", "bonn_000001_000002_leftImg8bit.png"]
    img = Image.open(out / files[0])
    assert img.mode == "P" and img.size == (64, 32) and np.asarray(img).max() < 19
    before = (out / files[0]).stat().st_mtime_ns
    assert _predict(str(checkpoint), str(images), "--out", str(out)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / files[0]).stat().st_mtime_ns == before
    assert _predict(str(checkpoint), str(images), "--out", str(out), "--overwrite", "--format", "blend") == 0
    assert Image.open(out / files[0]).mode == "RGB"


def test_predict_cityscapes_submission(checkpoint, images, tmp_path, capsys) -> None:
    out = tmp_path / "sub"
    assert _predict(str(checkpoint), str(images), "--out", str(out), "--format", "cityscapes-submission") == 0
    label_ids = {lb.id for lb in LABELS if lb.train_id != 255}
    for name in ("berlin_000000_000019_leftImg8bit.png", "bonn_000001_000002_leftImg8bit.png"):
        img = Image.open(out / name)
        assert img.mode == "L" and set(np.unique(np.asarray(img)).tolist()) <= label_ids
    odd = tmp_path / "holiday.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(odd)
    assert _predict(str(checkpoint), str(odd), "--out", str(tmp_path / "x"), "--format", "cityscapes-submission") == 1
    assert "Cityscapes image name" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any work


def test_predict_bare_state_dict_and_missing_input(tmp_path, images, capsys) -> None:
    net = build_segmentor("deeplabv3", "mobilenetv2", 5)
    bare = tmp_path / "bare.pth"
    torch.save(net.state_dict(), bare)
    assert _predict(str(bare), str(images), "--out", str(tmp_path / "o")) == 1
    assert "--backbone" in capsys.readouterr().err
    assert _predict(str(bare), str(images / "nope.png"), "--out", str(tmp_path / "o"),
                    "--model", "deeplabv3", "--backbone", "mobilenetv2") == 1
    assert "no such file" in capsys.readouterr().err
    assert _predict(str(bare), str(images), "--out", str(tmp_path / "o"), "--format", "trainid",
                    "--model", "deeplabv3", "--backbone", "mobilenetv2") == 0
    assert np.asarray(Image.open(tmp_path / "o" / "berlin_000000_000019_leftImg8bit.png")).max() < 5


class _Split(torch.utils.data.Dataset):
    num_classes = 19
    class_names = tuple(str(i) for i in range(19))
    palette = tuple((i * 12, 0, 255 - i * 12) for i in range(19))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randint(0, 256, (3, 24, 40), generator=g, dtype=torch.uint8),
                "mask": torch.randint(0, 19, (24, 40), generator=g, dtype=torch.uint8),
                "name": f"aachen_00000{i}_000019", "index": i}


def test_predict_dataset_panel_with_teacher(checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cskd.data, "build_dataset", lambda name, root, split, transform=None, **kw: _Split(),
                        raising=False)
    monkeypatch.setattr(cskd.data, "build_eval_transform", lambda: None, raising=False)
    root = tmp_path / "cityscapes"
    root.mkdir()
    out = tmp_path / "panels"
    out.mkdir()
    (out / "old.txt").write_text("x")
    args = [str(checkpoint), str(root), "--dataset", "cityscapes", "--split", "val", "--out", str(out),
            "--format", "panel", "--teacher", str(checkpoint)]
    assert _predict(*args) == 1  # --out not empty
    assert _predict(*args, "--overwrite") == 0
    panel = Image.open(out / "aachen_000000_000019.png")
    assert panel.width == 4 * 40 + 3 * 4  # image | ground truth | prediction | teacher


# ------------------------------------------------------------------------------------------------ end to end


def test_cli_on_a_cityscapes_tree_agrees_with_the_official_evaluator(tmp_path, monkeypatch) -> None:
    """`cskd eval` on a tiny Cityscapes tree (read by cskd.data) and `cskd predict --format cityscapes-submission`
    scored by cityscapesscripts give the same class IoUs."""
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    rng = np.random.default_rng(11)
    root = tmp_path / "cityscapes"
    ids = np.array([lb.id for lb in LABELS])
    gts = []
    for i in range(3):
        stem = f"bonn_{i:06d}_000019"
        (root / "leftImg8bit" / "val" / "bonn").mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / "val" / "bonn").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 64, 3)).astype(np.uint8)).save(
            root / "leftImg8bit" / "val" / "bonn" / f"{stem}_leftImg8bit.png")
        gt = root / "gtFine" / "val" / "bonn" / f"{stem}_gtFine_labelIds.png"
        Image.fromarray(rng.choice(ids, size=(32, 64)).astype(np.uint8)).save(gt)
        gts.append(str(gt))
    ckpt = tmp_path / "model.pth"
    net = _calibrated_net()
    torch.save({"model": net.state_dict(), "spec": net.spec.to_dict()}, ckpt)
    common = ["--device", "cpu", "--workers", "0", "--no-progress"]
    assert main(["eval", str(ckpt), "--dataset", "cityscapes", "--data-root", str(root), "--out", str(tmp_path),
                 *common]) == 0
    ours = json.loads((tmp_path / "model_val_whole.json").read_text())
    res = tmp_path / "results"
    assert main(["predict", str(ckpt), str(root), "--dataset", "cityscapes", "--split", "val", "--out", str(res),
                 "--format", "cityscapes-submission", *common]) == 0
    assert len(list(res.iterdir())) == 3
    assert main(["predict", str(ckpt), str(root), "--dataset", "cityscapes", "--split", "val", "--out", str(res),
                 "--format", "cityscapes-submission", *common]) == 1  # exact names known: refused, nothing redone

    for key, value in {"evalInstLevelScore": False, "JSONOutput": False, "quiet": True,
                       "predictionPath": str(res), "predictionWalk": None}.items():
        monkeypatch.setattr(ev.args, key, value)
    result = ev.evaluateImgLists([ev.getPrediction(ev.args, gt) for gt in gts], gts, ev.args)
    theirs = [result["classScores"][c["name"]] for c in ours["classes"]]
    mine = [np.nan if c["iou"] is None else c["iou"] for c in ours["classes"]]
    np.testing.assert_allclose(mine, theirs, rtol=1e-9, atol=1e-12)
    assert result["averageScoreClasses"] == pytest.approx(ours["miou"], abs=1e-12)
    assert sum(v > 0 for v in mine if not np.isnan(v)) >= 5  # predictions vary: many classes score
