"""Dataset layouts, label mapping, ignore handling and every bad-data case, on tiny fake trees made here."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cskd.cli import main as cli_main
from cskd.data import (DATASETS, BadSampleWarning, DatasetInfo, build_dataset, build_train_transform, check_split,
                       dataset_info)
from cskd.errors import DataError

H, W = 16, 32

# The official Cityscapes id → trainId table (cityscapesScripts helpers/labels.py), written out independently.
OFFICIAL_CS_TRAIN_ID = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3, 13: 4,
    14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18,
}
OFFICIAL_CS_COLOURS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]


def _img(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)


def _lab(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        im.putdata(arr.ravel().tolist())
    im.save(path)


def _ramp(values: list[int]) -> np.ndarray:
    """An H×W label cycling through ``values`` column by column."""
    cols = np.array(values)[np.arange(W) % len(values)]
    return np.broadcast_to(cols, (H, W)).copy()


def make_cityscapes(root: Path, counts: dict[str, int] | None = None) -> Path:
    counts = counts or {"train": 3, "val": 2, "test": 2}
    for split, n in counts.items():
        for i in range(n):
            city = "aachen" if i % 2 == 0 else "bremen"
            stem = f"{city}_{i:06d}_000019"
            _img(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", i)
            if split != "test":
                _lab(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", _ramp(list(range(34))))
                # the other gtFine files of the official package must not confuse the loader
                _lab(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", _ramp([0]))
    return root


def make_camvid(root: Path) -> Path:
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        for i in range(n):
            _img(root / split / f"0001TP_{i:06d}.png", i)
            _lab(root / f"{split}annot" / f"0001TP_{i:06d}.png", _ramp(list(range(12))))
    return root


def make_voc(root: Path, aug: bool = True) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    ids = [f"2007_{i:06d}" for i in range(5)]
    for k, i in enumerate(ids):
        _img(voc / "JPEGImages" / f"{i}.jpg", k)
        _lab(voc / "SegmentationClass" / f"{i}.png", _ramp([0, 1, 15, 20, 255]), palette=True)
        if aug:
            _lab(voc / "SegmentationClassAug" / f"{i}.png", _ramp([0, 7, 255]))
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("\n".join(ids[3:]) + "\n")
    (lists / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    if aug:
        (lists / "train_aug.txt").write_text("\n".join(ids[:3]) + "\n")
    return root


def make_ade(root: Path) -> Path:
    ade = root / "ADEChallengeData2016"
    for split, n in (("training", 3), ("validation", 2)):
        for i in range(n):
            stem = f"ADE_{split[:5]}_{i:08d}"
            _img(ade / "images" / split / f"{stem}.jpg", i)
            _lab(ade / "annotations" / split / f"{stem}.png", _ramp([0, 1, 2, 150]))
    return root


# --------------------------------------------------------------------------- registry and class tables
def test_registry_and_info_without_disk():
    assert set(DATASETS) >= {"cityscapes", "camvid", "voc", "ade20k", "synthscapes"}
    expected = {"cityscapes": 19, "camvid": 11, "voc": 21, "ade20k": 150}
    for name, n in expected.items():
        info = dataset_info(name)
        assert isinstance(info, DatasetInfo)
        assert info.num_classes == n == len(info.class_names) == len(info.palette)
        assert info.ignore_index == 255
        assert len(set(info.palette)) == n, f"{name}: palette colours must be distinct"
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in info.palette)
    assert dataset_info("synthscapes").num_classes >= 10
    with pytest.raises(DataError, match="unknown dataset"):
        dataset_info("kitti")
    with pytest.raises(Exception):
        dataset_info("voc").num_classes = 3  # frozen


def test_cityscapes_palette_and_names_are_official():
    info = dataset_info("cityscapes")
    assert list(info.palette) == OFFICIAL_CS_COLOURS
    assert info.class_names[0] == "road" and info.class_names[13] == "car" and info.class_names[18] == "bicycle"


def test_voc_palette_is_the_standard_one():
    pal = dataset_info("voc").palette
    # the standard VOC colours of a few classes
    assert pal[0] == (0, 0, 0) and pal[1] == (128, 0, 0) and pal[2] == (0, 128, 0) and pal[3] == (128, 128, 0)
    assert pal[15] == (192, 128, 128) and pal[20] == (0, 64, 128)
    assert dataset_info("voc").class_names[15] == "person"


def test_synthscapes_uses_cityscapes_colours():
    cs, syn = dataset_info("cityscapes"), dataset_info("synthscapes")
    for name, colour in zip(syn.class_names, syn.palette):
        assert colour == cs.palette[cs.class_names.index(name)]


# --------------------------------------------------------------------------- layouts
def test_cityscapes_layout_counts_names_and_mapping(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    train = build_dataset("cityscapes", root, "train")
    assert len(train) == 3 and train.has_labels and train.num_classes == 19
    assert train.samples[0].name == "aachen_000000_000019"
    s = train[0]
    assert s["image"].dtype == torch.uint8 and tuple(s["image"].shape) == (3, H, W)
    assert s["mask"].dtype == torch.uint8 and tuple(s["mask"].shape) == (H, W)
    assert s["name"] == "aachen_000000_000019" and s["index"] == 0
    # column c holds label id c % 34: compare with the official table, written independently above
    got = s["mask"][0].tolist()
    want = [OFFICIAL_CS_TRAIN_ID[c % 34] for c in range(W)]
    assert got == want
    assert s["mask"][0, 7] == 0 and s["mask"][0, 26] == 13 and all(s["mask"][0, c] == 255 for c in range(7))
    assert len(build_dataset("cityscapes", root, "val")) == 2
    assert len(build_dataset("cityscapes", root, "trainval")) == 5


def test_cityscapes_test_split_has_no_labels_and_keeps_stems(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    test = build_dataset("cityscapes", root, "test")
    assert not test.has_labels and all(s.label_path is None for s in test.samples)
    s = test[1]
    assert "mask" not in s and s["name"] == "bremen_000001_000019"
    assert s["image"].shape[1:] == (H, W)


def test_camvid_layout_void_is_ignored(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    assert [len(build_dataset("camvid", root, sp)) for sp in ("train", "val", "test", "trainval")] == [3, 2, 2, 5]
    s = build_dataset("camvid", root, "test")[0]
    assert s["mask"][0, :12].tolist() == list(range(11)) + [255]
    assert s["name"] == "0001TP_000000"


def test_voc_aug_labels_palette_fallback_and_lists(tmp_path):
    root = make_voc(tmp_path / "voc")
    train = build_dataset("voc", root, "train")  # train_aug.txt, SegmentationClassAug preferred
    assert len(train) == 3 and train.samples[0].label_path.parent.name == "SegmentationClassAug"
    assert train[0]["mask"][0, :3].tolist() == [0, 7, 255]
    assert len(build_dataset("voc", root, "val")) == 2
    plain = build_dataset("voc", root, "train.txt")  # the literal 1,464-image list
    assert len(plain) == 2
    with pytest.raises(DataError, match="trainval.txt not found"):
        build_dataset("voc", root, "trainval")


def test_voc_palette_png_labels_read_as_indices(tmp_path):
    root = make_voc(tmp_path / "voc", aug=False)
    with pytest.raises(DataError, match="train_aug.txt"):
        build_dataset("voc", root, "train")
    val = build_dataset("voc", root / "VOCdevkit" / "VOC2012", "val")
    assert val.samples[0].label_path.parent.name == "SegmentationClass"
    assert val[0]["mask"][0, :5].tolist() == [0, 1, 15, 20, 255]  # palette indices, never colours


def test_ade20k_zero_ignored_others_shifted(tmp_path):
    root = make_ade(tmp_path / "ade")
    train = build_dataset("ade20k", root, "train")  # parent of ADEChallengeData2016 is accepted
    assert len(train) == 3 and len(build_dataset("ade20k", root / "ADEChallengeData2016", "val")) == 2
    assert train[0]["mask"][0, :4].tolist() == [255, 0, 1, 149]


def test_split_and_root_errors(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    with pytest.raises(DataError, match="no split 'training'"):
        build_dataset("cityscapes", root, "training")
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("cityscapes", tmp_path / "nowhere", "train")
    empty = make_cityscapes(tmp_path / "empty", {"train": 0})
    (empty / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        build_dataset("cityscapes", empty, "train")
    (tmp_path / "camvid" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        build_dataset("camvid", tmp_path / "camvid", "train")


# --------------------------------------------------------------------------- bad data
def test_missing_label_raises_at_construction_or_is_dropped(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    gone = root / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelIds.png"
    gone.unlink()
    with pytest.raises(DataError, match=r"1 of 3 images .* no label file.*bremen_000001_000019_gtFine_labelIds"):
        build_dataset("cityscapes", root, "train")
    with pytest.warns(BadSampleWarning, match="dropping 1 of 3"):
        ds = build_dataset("cityscapes", root, "train", skip_bad=True)
    assert len(ds) == 2 and all(s.label_path.is_file() for s in ds.samples)


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_image_names_file_or_is_skipped_deterministically(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    ds = build_dataset("cityscapes", root, "train")
    _corrupt(ds.samples[1].image_path)
    with pytest.raises(DataError, match=rf"{ds.samples[1].image_path.name}.*(truncated|corrupt)"):
        ds[1]
    skip = build_dataset("cityscapes", root, "train", skip_bad=True)
    with pytest.warns(BadSampleWarning, match=rf"1 skipped so far.*{skip.samples[1].image_path.name}"):
        s = skip[1]
    assert s["index"] == 2 and s["name"] == skip.samples[2].name  # the next readable one, always
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert skip[1]["index"] == 2  # known bad: no second decode attempt, no second warning


def test_all_bad_is_an_error_even_when_skipping(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"train": 2})
    ds = build_dataset("cityscapes", root, "train", skip_bad=True)
    for s in ds.samples:
        s.image_path.write_bytes(b"not a png")
    with pytest.warns(BadSampleWarning), pytest.raises(DataError, match="none of the 2 samples"):
        ds[0]


def test_label_values_outside_the_dataset(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    ds = build_dataset("cityscapes", root, "train")
    _lab(ds.samples[0].label_path, _ramp([7, 40, 200]))
    with pytest.raises(DataError, match=r"aachen_000000_000019_gtFine_labelIds.png: label holds value\(s\) 40, 200"):
        ds[0]
    camvid = build_dataset("camvid", make_camvid(tmp_path / "camvid"), "train")
    _lab(camvid.samples[0].label_path, _ramp([3, 12]))
    with pytest.raises(DataError, match="12"):
        camvid[0]
    voc = build_dataset("voc", make_voc(tmp_path / "voc"), "val")
    _lab(voc.samples[0].label_path, _ramp([0, 21, 255]))
    with pytest.raises(DataError, match="21"):
        voc[0]
    ade = build_dataset("ade20k", make_ade(tmp_path / "ade"), "val")
    _lab(ade.samples[0].label_path, _ramp([0, 151]))
    with pytest.raises(DataError, match="151"):
        ade[0]


def test_size_mismatch_and_colour_label(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    ds = build_dataset("cityscapes", root, "train")
    _lab(ds.samples[0].label_path, np.zeros((H, W + 2)))
    with pytest.raises(DataError, match=rf"label is {H}×{W + 2} but its image .* is {H}×{W}"):
        ds[0]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(ds.samples[1].label_path)
    with pytest.raises(DataError, match="mode RGB .* colour visualisation"):
        ds[1]


def test_check_split_reports_every_problem(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"train": 6})
    samples = build_dataset("cityscapes", root, "train").samples
    samples[0].label_path.unlink()  # missing label
    _corrupt(samples[1].image_path)  # corrupt image
    _lab(samples[2].label_path, _ramp([7, 99]))  # value outside the ids
    _lab(samples[3].label_path, np.zeros((H + 1, W)))  # size mismatch
    report = check_split("cityscapes", root, "train", workers=2)
    assert report.num_samples == 6 and not report.ok and report.num_bad == 4
    text = report.format()
    for needle in ("no label file", "truncated", "99", f"{H + 1}×{W}"):
        assert needle in text, needle
    good = check_split("cityscapes", make_cityscapes(tmp_path / "good"), "val", workers=1)
    assert good.ok and "no problems found" in good.format()
    assert good.class_pixels.sum() + good.ignored_pixels == 2 * H * W
    # road (id 7) is one column in every 34: its share is exact
    assert good.class_pixels[0] == 2 * H * sum(1 for c in range(W) if c % 34 == 7)


def test_quick_check_reads_headers_only(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"train": 6})
    samples = build_dataset("cityscapes", root, "train").samples
    samples[0].label_path.unlink()  # missing label: found
    _lab(samples[1].label_path, np.zeros((H, W + 3)))  # size mismatch: found
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(samples[2].label_path)  # colour label: found
    samples[3].image_path.write_bytes(b"garbage")  # unidentifiable: found
    _lab(samples[4].label_path, _ramp([7, 99]))  # bad values: needs the pixels, left to the full scan
    report = check_split("cityscapes", root, "train", quick=True)
    assert report.num_bad == 4 and report.class_pixels is None
    text = report.format()
    for needle in ("no label file", f"{H}×{W + 3}", "mode RGB", "cannot read image header"):
        assert needle in text, needle
    assert "99" not in text
    assert check_split("cityscapes", root, "train", workers=1).num_bad == 5


def test_cli_check(tmp_path, capsys):
    root = make_camvid(tmp_path / "camvid")
    assert cli_main(["data", "check", "camvid", str(root), "--split", "val", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "camvid val" in out and "2 samples" in out and "no problems found" in out
    _corrupt(root / "val" / "0001TP_000001.png")
    assert cli_main(["data", "check", "camvid", str(root), "--split", "val", "--workers", "1"]) == 1
    assert "0001TP_000001.png" in capsys.readouterr().out
    assert cli_main(["data", "check", "camvid", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_dataset_pickles_for_spawned_workers(tmp_path):
    for name, make in (("cityscapes", make_cityscapes), ("voc", make_voc), ("camvid", make_camvid)):
        ds = build_dataset(name, make(tmp_path / name), "val", build_train_transform((8, 8)))
        clone = pickle.loads(pickle.dumps(ds))
        assert clone.samples == ds.samples and clone[0]["mask"].shape == (8, 8)
