"""COCO-Stuff-164K (issue #22 item 10): the standard layout with either label form, the 182 → 171 mapping, the
class names, ``cskd data check``, the shipped configs; on tiny trees generated here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cskd.cli import main as cli_main
from cskd.data import DATASETS, build_dataset, build_train_transform, check_split, dataset_info
from cskd.data.info import COCOSTUFF_UNUSED_VALUES
from cskd.engine.config import load_config
from cskd.errors import DataError

H, W = 12, 20
REPO = Path(__file__).resolve().parents[1]
# Stored stuffthingmaps value (COCO category id − 1) → the 171-class train id, for a few classes checked by hand.
RAW_TO_TRAIN = {0: 0, 10: 10, 12: 11, 26: 24, 30: 26, 45: 40, 66: 60, 69: 61, 71: 62, 83: 73, 89: 79, 91: 80,
                181: 170, 255: 255}


def _jpg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path, quality=95)


def _png(path: Path, values: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = np.array(values, np.uint8)[np.arange(W) % len(values)]
    Image.fromarray(np.broadcast_to(cols, (H, W)).copy()).save(path)


def make_coco(root: Path, raw: bool, counts: dict[str, int] | None = None) -> Path:
    for split, n in (counts or {"train": 3, "val": 2}).items():
        for i in range(n):
            stem = f"{i + 139:012d}"
            _jpg(root / "images" / f"{split}2017" / f"{stem}.jpg", i)
            if raw:
                _png(root / "annotations" / f"{split}2017" / f"{stem}.png", list(RAW_TO_TRAIN))
            else:
                _png(root / "annotations" / f"{split}2017" / f"{stem}_labelTrainIds.png", [0, 80, 170, 255])
    return root


def test_classes_and_registration() -> None:
    assert {"cocostuff", "cocostuff_raw"} <= set(DATASETS)
    for name in ("cocostuff", "cocostuff_raw"):
        info = dataset_info(name)
        assert info.num_classes == 171 == len(set(info.class_names)) == len(set(info.palette))
    names = dataset_info("cocostuff").class_names
    assert names[:3] == ("person", "bicycle", "car") and names[79] == "toothbrush"  # the 80 things
    assert names[80] == "banner" and names[-1] == "wood" and "sky-other" in names  # the 91 stuff classes
    assert len(COCOSTUFF_UNUSED_VALUES) == 182 - 171


def test_label_train_ids_layout(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco", raw=False)
    train = build_dataset("cocostuff", root, "train")
    assert len(train) == 3 and train.samples[0].name == "000000000139"
    assert train[0]["mask"][0, :4].tolist() == [0, 80, 170, 255]
    parent = tmp_path / "data"
    (parent).mkdir()
    (root).rename(parent / "coco_stuff164k")  # the folder holding coco_stuff164k/ is accepted
    assert len(build_dataset("cocostuff", parent, "val")) == 2
    crop = build_dataset("cocostuff", parent, "train", build_train_transform((8, 8)))[1]
    assert crop["image"].shape == (3, 8, 8) and crop["mask"].shape == (8, 8)


def test_stuffthingmaps_are_mapped_to_171_classes(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco", raw=True)
    mask = build_dataset("cocostuff_raw", root, "val")[0]["mask"]
    assert mask[0, : len(RAW_TO_TRAIN)].tolist() == list(RAW_TO_TRAIN.values())
    with pytest.raises(DataError, match="stuffthingmaps.*cocostuff_raw"):
        build_dataset("cocostuff", root, "val")  # the label form named, with the dataset that reads it


def test_undefined_values_missing_files_and_empty_splits(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco", raw=True)
    ds = build_dataset("cocostuff_raw", root, "train")
    _png(ds.samples[0].label_path, [0, 11, 182])  # 11: an unused COCO id; 182: beyond the 182 ids
    with pytest.raises(DataError, match=r"000000000139.png: label holds value\(s\) 11, 182"):
        ds[0]
    ids = make_coco(tmp_path / "ids", raw=False)
    tid = build_dataset("cocostuff", ids, "val")
    _png(tid.samples[1].label_path, [3, 171])
    with pytest.raises(DataError, match="171"):
        tid[1]
    (ids / "annotations" / "train2017" / "000000000140_labelTrainIds.png").unlink()
    with pytest.raises(DataError, match="1 of 3 images .* no label file"):
        build_dataset("cocostuff", ids, "train")
    with pytest.raises(DataError, match=r"no images found in .*images/train2017/\*\.jpg"):
        build_dataset("cocostuff", tmp_path / "coco" / "annotations", "train")
    with pytest.raises(DataError, match="no split 'test'"):
        build_dataset("cocostuff", ids, "test")


def test_data_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_coco(tmp_path / "coco", raw=True, counts={"val": 3})
    good = check_split("cocostuff_raw", root, "val", workers=1)
    assert good.ok and good.class_pixels is not None and int(good.class_pixels[170]) > 0
    _png(root / "annotations" / "val2017" / "000000000140.png", [44, 7])
    assert cli_main(["data", "check", "cocostuff_raw", str(root), "--split", "val", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "000000000140.png" in out and "44" in out


def test_shipped_configs() -> None:
    files = sorted((REPO / "configs" / "cocostuff").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = load_config(f)
        assert cfg.data.dataset == "cocostuff" and cfg.data.crop_size == (512, 512)
        assert cfg.train.batch_size == 16 and cfg.train.lr == 0.02 and cfg.train.budget.iterations == 80000
    cskd = load_config(REPO / "configs/cocostuff/cskd_deeplabv3-r101_deeplabv3-r18.yaml",
                       ["data.dataset=cocostuff_raw"])
    assert cskd.method == "cskd" and cskd.teacher is not None and cskd.teacher.backbone == "resnet101"
