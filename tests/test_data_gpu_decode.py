"""``data.decode: gpu``: JPEGs left encoded by the loader and decoded and augmented on the device.

On the CPU, ``decode_jpeg`` uses the loader's own libjpeg-turbo and the device-side resize is torchvision's uint8
CPU kernel, so :func:`decode_batch` run with ``device="cpu"`` must give the CPU path's batch *exactly* (tolerance 0):
any difference would be a different window, flip, padding or resize, not decoder rounding. Labels are identical in
every case. The CUDA test (skipped without a GPU) allows for nvJPEG's different IDCT and chroma upsampling.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import cskd.data.gpu_decode as gpu_decode
from cskd.data import build_dataset, build_train_transform
from cskd.data.gpu_decode import decode_batch, is_encoded, resolve_decode
from cskd.data.io import read_encoded_image
from cskd.data.synthetic import render_sample
from cskd.data.transforms import PLAN_FIELDS, RandomScaleCrop, read_plan
from cskd.data.workers import iterate
from cskd.engine.config import config_from_dict
from cskd.engine.records import read_records
from cskd.engine.sampling import SeededBatchSampler, SeededSamples, StampedCollate
from cskd.engine.trainer import Trainer
from cskd.errors import ConfigError, DataError

CROP = (32, 32)
# Larger than the crop, smaller (padded at most scales), and in between; one portrait, one landscape.
SIZES = [(40, 56), (24, 30), (64, 48), (48, 80), (36, 36), (56, 40), (30, 60), (44, 44)]


def make_voc(root: Path, sizes: list[tuple[int, int]] = SIZES, n_val: int = 2) -> Path:
    """A VOC-layout split of JPEG street scenes (quality 90) with PNG labels (ids folded into VOC's 0-20)."""
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{k:06d}" for k in range(len(sizes) + n_val)]
    for k, (i, size) in enumerate(zip(ids, sizes + [(40, 48)] * n_val)):
        img, lab = render_sample(0, "train", k, size)
        Image.fromarray(img).save(voc / "JPEGImages" / f"{i}.jpg", quality=90)
        Image.fromarray((lab % 21).astype(np.uint8)).save(voc / "SegmentationClassAug" / f"{i}.png")
    lists = voc / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").write_text("\n".join(ids[: len(sizes)]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[len(sizes):]) + "\n")
    return root


def _jpeg(ds, k: int) -> Path:
    return ds.samples[k].image_path


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_voc(tmp_path_factory.mktemp("voc"))
    ds = build_dataset("voc", root, "train")
    # The odd files of real JPEG datasets: a greyscale JPEG, a CMYK JPEG, a PNG named .jpg (the last two are
    # decoded by the CPU decoder in the main process; nvJPEG gets the rest of the batch).
    grey = Image.open(_jpeg(ds, 1)).convert("L")
    grey.save(_jpeg(ds, 1), quality=90)
    Image.open(_jpeg(ds, 3)).convert("CMYK").save(_jpeg(ds, 3), "JPEG", quality=90)
    png = Image.open(_jpeg(ds, 5))
    png.load()
    png.save(_jpeg(ds, 5), "PNG")
    return root


def _pair(root: Path, hflip: bool = True, scales: tuple[float, float] = (0.5, 2.0)):
    ds = build_dataset("voc", root, "train")
    cpu = SeededSamples(ds, build_train_transform(CROP, scales, hflip), seed=3)
    enc = SeededSamples(ds.with_encoded_images(), build_train_transform(CROP, scales, hflip, encoded=True), seed=3)
    return cpu, enc


def test_the_same_key_draws_the_same_window_and_flip_and_crops_the_same_label(voc_root, monkeypatch):
    drawn: list = []
    window = RandomScaleCrop.window

    def recording(self, h, w):
        win = window(self, h, w)
        drawn.append(win)
        return win

    monkeypatch.setattr(RandomScaleCrop, "window", recording)
    cpu, enc = _pair(voc_root)
    cpu_noflip, _ = _pair(voc_root, hflip=False)
    flips, padded = [], 0
    for epoch in range(6):
        for index in range(len(SIZES)):
            key = (epoch, index)
            drawn.clear()
            a = cpu[key]
            e = enc[key]
            b = cpu_noflip[key]  # the same draws up to the flip, which it does not draw
            win_cpu, win_enc, win_noflip = drawn
            assert win_cpu == win_enc == win_noflip
            size, win, flip = read_plan(e["image_plan"].tolist())
            assert size == SIZES[index] and win.padding == win_cpu.padding
            assert (win.top, win.left, win.src_h, win.src_w, win.out_h, win.out_w) == win_cpu[1:7]
            # the CPU path's flip, read off its label: the unflipped crop mirrored, or not
            flipped = torch.equal(a["mask"], b["mask"].flip(-1)) and not torch.equal(a["mask"], b["mask"])
            assert flip == flipped or torch.equal(a["mask"], a["mask"].flip(-1))
            assert torch.equal(e["mask"], a["mask"]) and e["mask"].dtype == torch.uint8
            assert e["name"] == a["name"] and e["index"] == a["index"]
            flips.append(flip)
            padded += any(win.padding)
    assert 0.25 < np.mean(flips) < 0.75 and padded > 5  # both flips and padded windows were exercised
    assert len(PLAN_FIELDS) == len(e["image_plan"])


def _batches(dataset, n_batches: int, batch: int = 4, workers: int = 0):
    sampler = SeededBatchSampler(len(dataset), batch, seed=3)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    out = []
    for b in iterate(loader):
        out.append(b)
        if len(out) == n_batches:
            break
    return out


def test_decode_batch_on_the_cpu_gives_the_cpu_path_exactly(voc_root):
    cpu, enc = _pair(voc_root)
    got_cpu, got_enc = _batches(cpu, 6), _batches(enc, 6)
    for a, e in zip(got_cpu, got_enc):
        assert not is_encoded(a) and is_encoded(e)
        assert isinstance(e["image_encoded"], list) and isinstance(e["image_encoded"][0], bytes)
        images = decode_batch(e, "cpu")
        assert images.shape == a["image"].shape == (4, 3, *CROP) and images.dtype == torch.uint8
        # the same decoder and the same uint8 resize kernel: equal, not merely close
        assert torch.equal(images, a["image"]), (images.int() - a["image"].int()).abs().max()
        assert torch.equal(e["mask"], a["mask"]) and e["name"] == a["name"]
    nvjpeg = torch.cat([e["image_nvjpeg"] for e in got_enc]).tolist()
    names = [n for e in got_enc for n in e["name"]]
    assert {n for n, ok in zip(names, nvjpeg) if not ok} == {"2007_000003", "2007_000005"}  # CMYK, PNG


def test_the_time_budget_calibrations_stamped_batches_decode_too(voc_root):
    cpu, enc = _pair(voc_root)
    keys = [(0, k) for k in range(4)]
    stamped = StampedCollate()([enc[k] for k in keys])  # what Trainer.plan_budget's loader collates
    assert "ready_at" in stamped and is_encoded(stamped)
    assert torch.equal(decode_batch(stamped, "cpu"), StampedCollate()([cpu[k] for k in keys])["image"])


def test_decode_batch_pads_with_the_fill_and_flips_the_padding_too(voc_root):
    ds = build_dataset("voc", voc_root, "train")
    small = [k for k, (h, w) in enumerate(SIZES) if h * 0.5 < CROP[0] and w * 0.5 < CROP[1]]
    cpu = SeededSamples(ds, build_train_transform(CROP, (0.5, 0.5)), seed=1)
    enc = SeededSamples(ds.with_encoded_images(), build_train_transform(CROP, (0.5, 0.5), encoded=True), seed=1)
    for key in [(e, k) for e in range(4) for k in small]:
        a, b = cpu[key], enc[key]
        batch = {k: [v] for k, v in b.items()}
        batch["image_plan"] = b["image_plan"][None]
        img = decode_batch(batch, "cpu")[0]
        assert torch.equal(img, a["image"])
        _, win, _ = read_plan(b["image_plan"].tolist())
        assert any(win.padding)


def test_auto_picks_the_cpu_without_cuda_and_gpu_is_refused_naming_the_key(voc_root, tmp_path):
    paths = [s.image_path for s in build_dataset("voc", voc_root, "train").samples]
    cpu = torch.device("cpu")
    assert resolve_decode("auto", cpu, paths) == "cpu" and resolve_decode("cpu", cpu, paths) == "cpu"
    with pytest.raises(ConfigError, match=r"data\.decode=gpu needs a CUDA training device"):
        resolve_decode("gpu", cpu, paths)
    cfg = config_from_dict(_config(voc_root, tmp_path / "a", "gpu"))
    with pytest.raises(ConfigError, match=r"data\.decode=gpu needs a CUDA training device, but train\.device "
                                          r"gives cpu"):
        Trainer(cfg, progress=False)
    trainer = Trainer(config_from_dict(_config(voc_root, tmp_path / "b", "auto")), progress=False)
    assert trainer.decode == "cpu" and not is_encoded(trainer.train_set[(0, 0)])
    with pytest.raises(ConfigError, match=r"key 'data\.decode' has value 'nvjpeg'; expected one of 'auto', 'cpu', "
                                          r"'gpu'"):
        config_from_dict(_config(voc_root, tmp_path / "c", "nvjpeg"))


def test_the_decoded_sample_cache_keeps_auto_on_the_cpu_and_refuses_gpu(voc_root, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_decode, "_ALLOW_CPU_DEVICE", True)
    paths = [s.image_path for s in build_dataset("voc", voc_root, "train").samples]
    assert resolve_decode("auto", torch.device("cuda"), paths, cached=True) == "cpu"  # no probe, no CUDA needed
    with pytest.raises(ConfigError, match=r"data\.decode=gpu and data\.cache exclude each other"):
        resolve_decode("gpu", torch.device("cpu"), paths, cached=True)
    raw = _config(voc_root, tmp_path / "run", "gpu")
    raw["data"]["cache"] = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"data\.decode=gpu and data\.cache"):
        Trainer(config_from_dict(raw), progress=False)


def test_gpu_decode_of_a_png_split_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setattr(gpu_decode, "_ALLOW_CPU_DEVICE", True)
    paths = [Path("a/x.jpg"), Path("a/y.png")]
    with pytest.raises(ConfigError, match=r"data\.decode=gpu decodes JPEG training images, but 1 of 2 .*y\.png"):
        resolve_decode("gpu", torch.device("cpu"), paths)
    assert resolve_decode("gpu", torch.device("cpu"), paths[:1]) == "gpu"
    assert resolve_decode("auto", torch.device("cuda"), paths) == "cpu"  # a PNG split: no probe, no CUDA needed


def test_a_corrupt_jpeg_header_is_the_one_line_error_naming_the_file_from_the_worker(tmp_path):
    root = make_voc(tmp_path / "voc", SIZES[:4], n_val=0)
    ds = build_dataset("voc", root, "train")
    bad = _jpeg(ds, 2)
    bad.write_bytes(bad.read_bytes()[:150])  # cut inside the header: no size to read
    enc = SeededSamples(ds.with_encoded_images(), build_train_transform(CROP, encoded=True), seed=0)
    with pytest.raises(DataError, match=rf"^{bad}: cannot read image \(.*\); the file is corrupt, truncated or not an "
                                        r"image$"):
        enc[(0, 2)]
    batches = iter(DataLoader(enc, batch_sampler=SeededBatchSampler(len(enc), 4, seed=0), num_workers=1))
    try:
        with pytest.raises(DataError) as info:  # read by a DataLoader worker: the same single line
            for _ in iterate(batches):
                pass
    finally:
        # The re-raised worker error sits in a reference cycle (torch's reraise frame) that holds the iterator;
        # left to the garbage collector, its worker would be stopped with a 5 s wait inside a later, timed test.
        batches._shutdown_workers()
    message = str(info.value)
    assert message.count("\n") == 0 and message.startswith(f"{bad}: cannot read image")
    skip = build_dataset("voc", root, "train", skip_bad=True).with_encoded_images()
    with pytest.warns(UserWarning, match=rf"1 skipped so far.*{bad.name}"):
        assert skip[2]["index"] == 3  # header-level damage is skipped in the worker, as on the CPU path
    bad.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{bad}: image file is empty"):
        enc[(0, 2)]


def test_damaged_pixel_data_is_found_at_decode_naming_the_file(tmp_path):
    root = make_voc(tmp_path / "voc", SIZES[:4], n_val=0)
    ds = build_dataset("voc", root, "train")
    bad = _jpeg(ds, 1)
    data = bad.read_bytes()
    bad.write_bytes(data[: data.index(b"\xff\xda") + 64])  # cut in the first scan: the header is whole, the worker
    assert read_encoded_image(bad).size == SIZES[1]  # cannot tell
    enc = SeededSamples(ds.with_encoded_images(), build_train_transform(CROP, encoded=True), seed=0)
    (batch,) = _batches(enc, 1, batch=4)
    with warnings.catch_warnings(), pytest.raises(DataError) as info:
        warnings.simplefilter("ignore")
        decode_batch(batch, "cpu")
    text = str(info.value)
    assert text.startswith(f"{bad}: cannot read image") and "\n" not in text
    assert "data.skip_bad cannot replace it" in text and "cskd data check" in text


def _config(root: Path, out: Path, decode: str, **train: object) -> dict:
    cfg = {
        "name": "voc-tiny", "output_dir": str(out),
        "data": {"dataset": "voc", "root": str(root), "train_split": "train", "val_split": "val",
                 "crop_size": list(CROP), "workers": 0, "decode": decode},
        "model": {"model": "deeplabv3", "backbone": "mobilenetv2"},
        "train": {"budget": {"iterations": 2}, "batch_size": 4, "lr": 0.01, "log_every": 1, "val_every": 1000,
                  "save_every": 1000, "device": "cpu", "amp": "none"},
        "eval": {"max_images": 1},
    }
    cfg["train"].update(train)
    return cfg


def test_two_engine_iterations_through_the_encoded_path_match_the_cpu_path(tmp_path, monkeypatch):
    """The engine, data.decode=gpu forced onto the CPU device (test-only switch): the batches go through
    StepRunner.prepare's decode and give the same losses as data.decode=cpu, to the bit."""
    root = make_voc(tmp_path / "voc", SIZES[:5])  # plain RGB JPEGs
    calls = []
    original = gpu_decode.decode_batch

    def counting(batch, device, fill=None):
        calls.append(len(batch["image_encoded"]))
        return original(batch, device, fill)

    monkeypatch.setattr(gpu_decode, "decode_batch", counting)
    monkeypatch.setattr(gpu_decode, "_ALLOW_CPU_DEVICE", True)
    losses = {}
    for decode in ("cpu", "gpu"):
        trainer = Trainer(config_from_dict(_config(root, tmp_path / decode, decode)), progress=False)
        assert trainer.decode == decode
        result = trainer.fit()
        assert result.iterations == 2
        losses[decode] = [r["loss"] for r in read_records(tmp_path / decode / "log.jsonl", "train")]
    assert calls == [4, 4]  # only the gpu run's two batches
    assert losses["gpu"] == losses["cpu"] and len(losses["cpu"]) == 2


# ------------------------------------------------------------------------------------------------ on a GPU only

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")


@needs_cuda
def test_cuda_decode_matches_the_cpu_path_up_to_the_decoders(voc_root):
    """nvJPEG vs libjpeg-turbo (IDCT, chroma upsampling) and float vs uint8 resize: a few levels on average,
    more at sharp colour edges; labels identical. The thresholds leave room for both; the GPU benchmark reports the
    measured numbers (benchmarks/gpu_decode.py)."""
    cpu, enc = _pair(voc_root)
    for a, e in zip(_batches(cpu, 4), _batches(enc, 4)):
        images = decode_batch(e, "cuda")
        assert images.device.type == "cuda" and images.shape == a["image"].shape
        diff = (images.cpu().int() - a["image"].int()).abs().float()
        assert diff.mean() < 3.0 and (diff > 24).float().mean() < 0.01, (diff.mean(), diff.max())
        assert torch.equal(e["mask"], a["mask"])


@needs_cuda
def test_two_engine_iterations_with_gpu_decode_on_cuda(tmp_path):
    root = make_voc(tmp_path / "voc", SIZES[:5])
    cfg = config_from_dict(_config(root, tmp_path / "run", "gpu", device="cuda", amp="bf16", compile=False))
    trainer = Trainer(cfg, progress=False)
    assert trainer.decode == "gpu"
    assert trainer.fit().iterations == 2
