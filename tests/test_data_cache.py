"""The decoded-sample cache (data.cache): the same samples as decoding, without decoding, and never a stale or
damaged entry."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cskd.data import build_dataset, build_eval_transform, build_train_transform
from cskd.data.cache import CacheWarning, DecodedCache
from cskd.engine.sampling import SeededSamples

SIZE = (32, 64)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cskd.data.synthetic import generate

    root = tmp_path_factory.mktemp("scenes")
    generate(root, n_train=4, n_val=2, size=SIZE, seed=0, workers=1)
    return root


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path):  # noqa: ANN001, ANN202
        raise AssertionError(f"decoded {path}, though it is cached")

    monkeypatch.setattr("cskd.data.datasets.read_image", refuse)
    monkeypatch.setattr("cskd.data.datasets.read_label", refuse)


def test_cached_samples_equal_decoded_ones_and_skip_decoding(scenes: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    plain = build_dataset("synthscapes", scenes, "train")
    cached = build_dataset("synthscapes", scenes, "train", cache=tmp_path / "cache")
    first = [cached.load(i) for i in range(len(cached))]  # fills the cache
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2 * len(cached)
    _no_decoding(monkeypatch)
    for i, filled in enumerate(first):
        again = cached.load(i)
        assert torch.equal(again["image"], filled["image"]) and torch.equal(again["mask"], filled["mask"])
        assert again["name"] == filled["name"] and again["index"] == i
    monkeypatch.undo()
    for i, filled in enumerate(first):
        ref = plain.load(i)
        assert filled["image"].dtype == torch.uint8 and filled["mask"].dtype == torch.uint8
        assert torch.equal(filled["image"], ref["image"]) and torch.equal(filled["mask"], ref["mask"])


def test_augmented_training_samples_are_the_same_with_the_cache(scenes: Path, tmp_path: Path) -> None:
    # The crop-first augmentation reads only its window of the memory-mapped arrays; the draws and the pixels
    # must be those of the decoded path, key by key.
    transform = build_train_transform((24, 40), (0.5, 2.0))
    plain = SeededSamples(build_dataset("synthscapes", scenes, "train"), transform, seed=3)
    cached = SeededSamples(build_dataset("synthscapes", scenes, "train", cache=tmp_path / "c"), transform, seed=3)
    for key in [(0, 0), (0, 1), (1, 2), (2, 3), (0, 0), (1, 2)]:  # the repeats read the filled entries
        a, b = plain[key], cached[key]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_an_edited_source_file_is_decoded_again(scenes: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(scenes, root)
    ds = build_dataset("synthscapes", root, "val", build_eval_transform(), cache=tmp_path / "cache")
    before = ds.load(0)
    # Overwrite image 0 with image 1's bytes: same size, other pixels, a new modification time.
    img0, img1 = ds.samples[0].image_path, ds.samples[1].image_path
    shutil.copyfile(img1, img0)
    st = img0.stat()
    os.utime(img0, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = ds.load(0)
    assert not torch.equal(after["image"], before["image"])
    assert torch.equal(after["image"], build_dataset("synthscapes", root, "val").load(1)["image"])


def test_a_damaged_entry_warns_and_is_rebuilt(scenes: Path, tmp_path: Path) -> None:
    ds = build_dataset("synthscapes", scenes, "val", cache=tmp_path / "cache")
    good = ds.load(0)
    image_file, _ = ds.cache.paths(ds.samples[0].image_path, ds.samples[0].label_path)
    image_file.write_bytes(image_file.read_bytes()[:100])  # truncated
    with pytest.warns(CacheWarning, match="damaged cache entry"):
        again = ds.load(0)
    assert torch.equal(again["image"], good["image"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert torch.equal(ds.load(0)["image"], good["image"])  # rewritten: no warning now


def test_an_unwritable_cache_warns_once_and_decoding_goes_on(scenes: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    ds = build_dataset("synthscapes", scenes, "train", cache=blocker)
    plain = build_dataset("synthscapes", scenes, "train")
    with pytest.warns(CacheWarning, match="cannot write the decoded-sample cache") as caught:
        samples = [ds.load(i) for i in range(len(ds))]
    assert sum(issubclass(w.category, CacheWarning) for w in caught) == 1
    for i, s in enumerate(samples):
        assert torch.equal(s["image"], plain.load(i)["image"])


def test_entries_are_keyed_by_the_label_table(scenes: Path, tmp_path: Path) -> None:
    from cskd.data.info import CITYSCAPES_TABLE, SYNTHSCAPES_TABLE

    sample = build_dataset("synthscapes", scenes, "val").samples[0]
    a = DecodedCache(tmp_path, "synthscapes", SYNTHSCAPES_TABLE).paths(sample.image_path, sample.label_path)
    b = DecodedCache(tmp_path, "synthscapes", CITYSCAPES_TABLE).paths(sample.image_path, sample.label_path)
    assert a[0] != b[0] and a[1] != b[1]


def test_a_wrong_shape_entry_is_not_trusted(scenes: Path, tmp_path: Path) -> None:
    ds = build_dataset("synthscapes", scenes, "val", cache=tmp_path / "cache")
    good = ds.load(0)
    _, label_file = ds.cache.paths(ds.samples[0].image_path, ds.samples[0].label_path)
    np.save(label_file, np.zeros((3, 3), np.uint8))
    with pytest.warns(CacheWarning, match="damaged"):
        assert torch.equal(ds.load(0)["mask"], good["mask"])


def test_a_training_run_fills_the_cache_from_its_workers(scenes: Path, tmp_path: Path) -> None:
    from cskd.engine.config import config_from_dict
    from cskd.engine.trainer import Trainer

    raw = {
        "name": "cached", "output_dir": str(tmp_path / "run"),
        "data": {"dataset": "synthscapes", "root": str(scenes), "crop_size": list(SIZE), "workers": 1,
                 "cache": str(tmp_path / "cache")},
        "model": {"model": "deeplabv3", "backbone": "mobilenetv2"},
        "train": {"budget": {"iterations": 2}, "batch_size": 2, "lr": 0.01, "val_every": 2, "save_every": 1000,
                  "device": "cpu", "amp": "none"},
        "eval": {"max_images": 2},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        Trainer(config_from_dict(raw), progress=False).fit()
    # 2 iterations × 2 training images (filled by the worker process) and the 2 validation images.
    entries = list((tmp_path / "cache" / "synthscapes").rglob("*.image.npy"))
    assert len(entries) == 6
    val = build_dataset("synthscapes", scenes, "val", cache=tmp_path / "cache")
    assert all(val.cache.paths(s.image_path, s.label_path)[0].is_file() for s in val.samples)
