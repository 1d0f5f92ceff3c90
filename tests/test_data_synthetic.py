"""The synthetic street scenes: determinism, layout, exact labels aligned with the pixels, ensure(), the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cskd.cli import main as cli_main
from cskd.data import build_dataset, dataset_info, synthetic
from cskd.errors import DataError

SIZE = (64, 128)
# Cityscapes label ids (official table) of the classes the generator must draw, by name.
CS_IDS = {"road": 7, "sidewalk": 8, "building": 11, "wall": 12, "fence": 13, "pole": 17, "traffic light": 19,
          "traffic sign": 20, "vegetation": 21, "terrain": 22, "sky": 23, "person": 24, "car": 26}


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def seed3_tree(tmp_path_factory) -> Path:
    """The generator's own subject: 4 + 2 images at 64×128, seed 3, written by two workers (not the shared
    ``synth_root`` of conftest.py, whose size and seed the engine tests rely on)."""
    root = tmp_path_factory.mktemp("synth_seed3")
    synthetic.generate(root, 4, 2, SIZE, seed=3, workers=2)
    return root


def test_layout_and_manifest(seed3_tree):
    imgs = sorted((seed3_tree / "leftImg8bit").rglob("*_leftImg8bit.png"))
    labs = sorted((seed3_tree / "gtFine").rglob("*_gtFine_labelIds.png"))
    assert len(imgs) == len(labs) == 6
    assert imgs[0].relative_to(seed3_tree).as_posix() == \
        "leftImg8bit/train/synthtrain00/synthtrain00_000000_000019_leftImg8bit.png"
    m = json.loads((seed3_tree / "manifest.json").read_text())
    assert m["seed"] == 3 and m["size"] == list(SIZE) and m["splits"] == {"train": 4, "val": 2}
    assert m["generator_version"] == synthetic.GENERATOR_VERSION
    for split in ("train", "val"):
        f = m["class_frequencies"][split]
        assert f["pixels"] == {"train": 4, "val": 2}[split] * SIZE[0] * SIZE[1]
        assert sum(f["classes"].values()) + f["ignored"] == pytest.approx(1.0, abs=1e-4)
    assert [c["name"] for c in m["classes"]] == list(dataset_info("synthscapes").class_names)
    assert "road" in synthetic.format_frequencies(m)


def test_same_seed_same_bytes_whatever_the_worker_count(seed3_tree, tmp_path):
    synthetic.generate(tmp_path / "one", 4, 2, SIZE, seed=3, workers=1)
    assert tree_bytes(tmp_path / "one") == tree_bytes(seed3_tree)
    synthetic.generate(tmp_path / "other", 4, 2, SIZE, seed=4, workers=1)
    other = tree_bytes(tmp_path / "other")
    assert other.keys() == tree_bytes(seed3_tree).keys()
    assert all(other[k] != v for k, v in tree_bytes(seed3_tree).items())


def test_loader_reads_it_with_its_own_train_ids(seed3_tree):
    info = dataset_info("synthscapes")
    assert info.num_classes >= 10
    ds = build_dataset("synthscapes", seed3_tree, "train")
    assert len(ds) == 4 and len(build_dataset("synthscapes", seed3_tree, "val")) == 2
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        with Image.open(ds.samples[i].label_path) as im:
            raw = np.array(im)
        mask = s["mask"].numpy()
        assert s["image"].shape == (3, *SIZE)
        for k, name in enumerate(info.class_names):
            assert np.array_equal(mask == k, raw == CS_IDS[name]), name
        assert np.array_equal(mask == 255, ~np.isin(raw, list(CS_IDS.values())))
        assert set(np.unique(raw)) <= set(CS_IDS.values()) | {1}  # 1 = ego vehicle, trained as ignore
        seen |= set(np.unique(mask).tolist())
    assert len(seen - {255}) >= 8


def _scenes(n: int, size: tuple[int, int] = (128, 256)) -> list[tuple[np.ndarray, np.ndarray]]:
    return [synthetic.render_sample(11, "train", i, size) for i in range(n)]


def test_scenes_are_street_like():
    scenes = _scenes(8)
    ids = np.concatenate([lab.ravel() for _, lab in scenes])
    present = {name for name, i in CS_IDS.items() if (ids == i).any()}
    assert len(present) >= 10, present
    # geometry: sky above buildings above the road, on average
    rows = {name: np.mean([np.nonzero(lab == CS_IDS[name])[0].mean() for _, lab in scenes
                           if (lab == CS_IDS[name]).any()]) for name in ("sky", "building", "road")}
    assert rows["sky"] < rows["building"] < rows["road"]
    # road and sidewalk share their grey: inside one image their mean brightness differs by much less than road
    # brightness varies between images, so no global colour threshold separates them
    gaps, road_means = [], []
    for img, lab in scenes:
        if (lab == CS_IDS["sidewalk"]).sum() > 200 and (lab == CS_IDS["road"]).sum() > 200:
            road = img[lab == CS_IDS["road"]].astype(float).mean()
            gaps.append(abs(road - img[lab == CS_IDS["sidewalk"]].astype(float).mean()))
            road_means.append(road)
    assert len(gaps) >= 4 and np.median(gaps) < 0.6 * np.std(road_means)


def test_labels_align_with_image_edges():
    """Label boundaries must sit on image edges: the image gradient there is far above its typical level, and
    shifting the label by a few pixels destroys that."""
    ratios, shifted = [], []
    for img, lab in _scenes(6):
        grey = img.astype(np.float32).mean(2)
        grad = np.abs(np.diff(grey, axis=1))  # H×(W−1)
        def ratio(lb: np.ndarray) -> float:
            edge = lb[:, 1:] != lb[:, :-1]
            return float(grad[edge].mean() / max(grad[~edge].mean(), 1e-6))
        ratios.append(ratio(lab))
        shifted.append(ratio(np.roll(lab, 3, axis=1)))
    assert np.median(ratios) > 2.5
    assert np.median(ratios) > 1.5 * np.median(shifted)


def test_far_objects_are_smaller():
    """Perspective: a car's pixel height shrinks as its bottom edge approaches the horizon."""
    heights, bottoms = [], []
    for _, lab in _scenes(12, (128, 256)):
        car = lab == CS_IDS["car"]
        cols = np.nonzero(car.any(0))[0]
        if len(cols) == 0:
            continue
        # column-wise vertical extent of car pixels, a rough per-object size that needs no instance ids
        for c in cols[:: max(1, len(cols) // 20)]:
            r = np.nonzero(car[:, c])[0]
            heights.append(r.max() - r.min() + 1)
            bottoms.append(r.max())
    assert len(heights) > 20
    assert np.corrcoef(bottoms, heights)[0, 1] > 0.3


@pytest.mark.parametrize("size", [(16, 16), (17, 33), (16, 512), (96, 24)])
def test_any_shape_renders(size):
    for i in range(12):
        img, lab = synthetic.render_sample(0, "val", i, size)
        assert img.shape == (*size, 3) and img.dtype == np.uint8 and lab.shape == size and lab.dtype == np.uint8


def test_ensure_reuses_or_regenerates(tmp_path):
    root = tmp_path / "s"
    assert synthetic.ensure(root, 2, 1, SIZE, seed=0, workers=1) == root
    first = (root / "manifest.json").stat().st_mtime_ns
    img = next((root / "leftImg8bit").rglob("*.png"))
    synthetic.ensure(root, 2, 1, SIZE, seed=0, workers=1)
    assert (root / "manifest.json").stat().st_mtime_ns == first  # same parameters: reused
    synthetic.ensure(root, 1, 1, (32, 64), seed=0, workers=1)  # another size and count: regenerated, old files gone
    assert len(list((root / "leftImg8bit" / "train").rglob("*.png"))) == 1
    assert image_size(img) == (64, 32)
    (root / "manifest.json").unlink()  # an interrupted run leaves no manifest
    synthetic.ensure(root, 1, 1, (32, 64), seed=0, workers=1)
    assert synthetic.read_manifest(root)["size"] == [32, 64]
    assert image_size(img) == (64, 32)


def test_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / "real" / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="not written by `cskd data synth`"):
        synthetic.generate(tmp_path / "real", 1, 0, SIZE, workers=1)
    assert (tmp_path / "real" / "leftImg8bit" / "train").is_dir()
    with pytest.raises(DataError, match="at least one image"):
        synthetic.generate(tmp_path / "x", 0, 0, SIZE)
    with pytest.raises(DataError, match="too small"):
        synthetic.generate(tmp_path / "x", 1, 0, (8, 8))


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--train", "2", "--val", "1", "--size", "32", "64", "--seed", "5",
            "--workers", "1"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "wrote 3 scenes of 32×64" in text and "images/s" in text and "sky" in text and "%" in text
    assert cli_main(args + ["--if-missing"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert synthetic.read_manifest(out)["seed"] == 5
