"""Inference modes (whole, slide, scales, flip), the evaluation loop and ``cskd eval`` on tiny synthetic data."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import cskd.data
from cskd.cli import main
from cskd.data.normalize import normalize
from cskd.errors import DataError
from cskd.evaluation import collate_eval, evaluate, predict_logits, window_starts
from cskd.evaluation.evaluate import Uploader
from cskd.models import build_segmentor
from cskd.models.segmentor import SegOutput

K = 3


class Pointwise(nn.Module):
    """Logits at full resolution from each pixel alone: any tiling of the image gives the same logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, K, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(K, 3, 1, 1, generator=g))
            self.conv.bias.copy_(torch.randn(K, generator=g))

    def forward(self, x: torch.Tensor) -> SegOutput:
        y = self.conv(x)
        return SegOutput(y, None, y)


class WindowMean(nn.Module):
    """Logits = the input's per-channel mean over the whole window, at stride 8."""

    def forward(self, x: torch.Tensor) -> SegOutput:
        h, w = math.ceil(x.shape[2] / 8), math.ceil(x.shape[3] / 8)
        y = x.mean(dim=(2, 3), keepdim=True).expand(-1, -1, h, w).contiguous()
        return SegOutput(y, None, y)


class Pool8(Pointwise):
    """Stride-8 logits that vary over the image: the pointwise classifier on 8×8 average-pooled input."""

    def forward(self, x: torch.Tensor) -> SegOutput:
        y = self.conv(F.avg_pool2d(x, 8, ceil_mode=True))
        return SegOutput(y, None, y)


class LeftDiff(nn.Module):
    """Not mirror-symmetric: logits = x − (x shifted one pixel right)."""

    def forward(self, x: torch.Tensor) -> SegOutput:
        y = x - F.pad(x, (1, 0))[..., :-1]
        return SegOutput(y, None, y)


def _images(b: int = 2, h: int = 10, w: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def test_window_starts_cover_the_axis() -> None:
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(4, 4, 3) == [0]
    assert window_starts(1024, 512, 341) == [0, 341, 512]


def test_slide_equals_whole_for_a_pointwise_model() -> None:
    net, x = Pointwise(), _images()
    whole = predict_logits(net, x, mode="whole")
    for crop, stride in [((4, 5), (3, 4)), ((8, 8), (8, 8)), ((16, 16), None), ((10, 13), (1, 1))]:
        slide = predict_logits(net, x, mode="slide", crop_size=crop, stride=stride)
        torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    assert whole.dtype == torch.float32 and whole.shape == (2, K, 10, 13)


def test_slide_averages_overlapping_windows() -> None:
    x = _images(b=1)
    out = predict_logits(WindowMean(), x, mode="slide", crop_size=(4, 5), stride=(3, 4))
    ys, xs = [0, 3, 6], [0, 4, 8]  # 10 = 6 + 4 and 13 = 8 + 5: the last windows end flush with the image
    expected = torch.zeros(1, 3, 10, 13, dtype=torch.float64)
    count = torch.zeros(10, 13, dtype=torch.float64)
    xd = x.double()
    for y in ys:
        for x0 in xs:
            expected[..., y:y + 4, x0:x0 + 5] += xd[..., y:y + 4, x0:x0 + 5].mean(dim=(2, 3), keepdim=True)
            count[y:y + 4, x0:x0 + 5] += 1
    torch.testing.assert_close(out.double(), expected / count, rtol=1e-5, atol=1e-6)


def test_slide_pads_small_images_with_zero() -> None:
    x = _images(b=1, h=5, w=6)
    out = predict_logits(WindowMean(), x, mode="slide", crop_size=(8, 8))
    expected = x.double().sum(dim=(2, 3), keepdim=True) / 64  # one 8×8 window, 0 (the mean colour) as padding
    torch.testing.assert_close(out.double(), expected.expand(1, 3, 5, 6), rtol=1e-5, atol=1e-6)


def test_window_batch_does_not_change_the_result() -> None:
    x = _images(b=2, h=12, w=17)
    full = predict_logits(WindowMean(), x, mode="slide", crop_size=(5, 6), stride=(3, 4))
    for wb in (1, 2, 5):
        torch.testing.assert_close(predict_logits(WindowMean(), x, mode="slide", crop_size=(5, 6), stride=(3, 4),
                                                  window_batch=wb), full)


def test_flip_averages_with_the_mirrored_prediction() -> None:
    net, x = LeftDiff(), _images()
    out = predict_logits(net, x, flip=True)
    with torch.no_grad():
        expected = 0.5 * (net(x).logits + net(x.flip(-1)).logits.flip(-1))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, predict_logits(net, x)), "the test model must not be mirror-symmetric"


def test_multiscale_output_size_and_average() -> None:
    net, x = Pointwise(), _images(h=13, w=22)
    scales = (0.5, 0.75, 1.5)
    out = predict_logits(net, x, scales=scales, out_size=(26, 44))
    parts = []
    for s in scales:
        xs = F.interpolate(x, size=(round(13 * s), round(22 * s)), mode="bilinear", align_corners=True)
        parts.append(F.interpolate(net(xs).logits, size=(26, 44), mode="bilinear", align_corners=True))
    torch.testing.assert_close(out, torch.stack(parts).mean(0), rtol=1e-5, atol=1e-5)


def test_whole_keeps_corner_logits_with_align_corners() -> None:
    net = Pool8()
    x = _images(b=1, h=64, w=96)
    out = predict_logits(net, x, out_size=(64, 96))
    with torch.no_grad():
        low = net(x).logits
    assert low.shape[-2:] == (8, 12) and out.shape == (1, K, 64, 96)
    torch.testing.assert_close(out[..., 0, 0], low[..., 0, 0])
    torch.testing.assert_close(out[..., -1, -1], low[..., -1, -1])
    loose = predict_logits(net, x, align_corners=False)
    assert not torch.allclose(loose, out)


def test_bf16_autocast_returns_float32() -> None:
    net, x = Pointwise(), _images()
    out = predict_logits(net, x, amp_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, predict_logits(net, x), rtol=0.05, atol=0.05)


def test_bad_arguments() -> None:
    net, x = Pointwise(), _images()
    with pytest.raises(ValueError, match="crop_size"):
        predict_logits(net, x, mode="slide")
    with pytest.raises(ValueError, match="mode"):
        predict_logits(net, x, mode="tiles")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float"):
        predict_logits(net, x[0])
    with pytest.raises(ValueError, match="scales"):
        predict_logits(net, x, scales=(0.0,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_slide_matches_fp32() -> None:
    net = build_segmentor("deeplabv3", "resnet18", K).cuda().eval()
    x = _images(b=1, h=128, w=256).cuda()
    ref = predict_logits(net, x, mode="slide", crop_size=(64, 128))
    out = predict_logits(net, x, mode="slide", crop_size=(64, 128), amp_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.95


# ------------------------------------------------------------------------------------------------ evaluate()


class TinySet(Dataset):
    """Dicts as the data package hands them out; sizes vary when ``sizes`` has several entries."""

    class_names = ("a", "b", "c")
    palette = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
    num_classes = K

    def __init__(self, n: int = 5, sizes=((12, 16),), labelled: bool = True) -> None:
        g = torch.Generator().manual_seed(1)
        self.items = []
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
            mask = torch.randint(0, K, (h, w), generator=g, dtype=torch.uint8)
            mask[torch.rand(h, w, generator=g) < 0.2] = 255
            item = {"image": image, "name": f"img{i}", "index": i}
            if labelled:
                item["mask"] = mask
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _reference_miou(net: nn.Module, ds: TinySet, limit: int | None = None) -> tuple[float, int]:
    tp, fp, fn = np.zeros(K), np.zeros(K), np.zeros(K)
    for item in ds.items[:limit]:
        with torch.no_grad():
            pred = net(normalize(item["image"][None])).logits.argmax(1)[0].numpy()
        t = item["mask"].numpy()
        ok = t != 255
        for c in range(K):
            tp[c] += np.sum((pred == c) & (t == c) & ok)
            fp[c] += np.sum((pred == c) & (t != c) & ok)
            fn[c] += np.sum((pred != c) & (t == c) & ok)
    denom = tp + fp + fn
    iou = tp[denom > 0] / denom[denom > 0]
    return float(iou.mean()), int(sum(int((it["mask"] != 255).sum()) for it in ds.items[:limit]))


def test_evaluate_scores_the_split_and_restores_train_mode() -> None:
    net, ds = Pointwise(), TinySet(n=5, sizes=((12, 16), (9, 20)))
    net.train()
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_eval)  # mixed sizes: lists of tensors
    m = evaluate(net, loader, num_classes=K, device="cpu", progress=False)
    miou, pixels = _reference_miou(net, ds)
    assert m.miou == pytest.approx(miou) and m.num_pixels == pixels
    assert net.training
    m2 = evaluate(net, loader, num_classes=K, device="cpu", progress=False, max_batches=1)
    assert m2.num_pixels == _reference_miou(net, ds, limit=2)[1]


def test_evaluate_stacked_batches_match_single_images() -> None:
    net, ds = Pointwise(), TinySet(n=4)
    a = evaluate(net, DataLoader(ds, batch_size=4), num_classes=K, device="cpu", progress=False)
    b = evaluate(net, DataLoader(ds, batch_size=1), num_classes=K, device="cpu", progress=False)
    assert a.confusion == b.confusion


def test_evaluate_needs_masks() -> None:
    with pytest.raises(DataError, match="no 'mask'"):
        evaluate(Pointwise(), DataLoader(TinySet(labelled=False)), num_classes=K, device="cpu", progress=False)


def test_uploader_copies_to_the_device_off_cuda() -> None:
    upload = Uploader(torch.device("cpu"))
    assert upload.stream is None
    image, mask = torch.randint(0, 256, (1, 3, 4, 5), dtype=torch.uint8), torch.randint(0, K, (1, 4, 5))
    x, t = upload(image, mask)
    assert torch.equal(x, image) and torch.equal(t, mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uploader_copies_on_a_side_stream_that_the_compute_stream_waits_for() -> None:
    upload = Uploader(torch.device("cuda"))
    assert upload.stream is not None and upload.stream != torch.cuda.current_stream()
    hosts = [torch.randint(0, 256, (1, 3, 256, 512), dtype=torch.uint8).pin_memory() for _ in range(6)]
    sums = []
    for host in hosts:
        with torch.cuda.stream(upload.stream):  # delay the copy: a compute stream that did not wait would read early
            torch.cuda._sleep(20_000_000)
        (x,) = upload(host)
        sums.append(x.sum(dtype=torch.int64))
    assert [int(s) for s in sums] == [int(h.sum(dtype=torch.int64)) for h in hosts]


# ------------------------------------------------------------------------------------------------ cskd eval


@pytest.fixture
def fake_data(monkeypatch):
    """Route cskd.data's dataset factory to TinySet (the CLI must not care where the data comes from)."""
    opened = []

    def build_dataset(name, root, split, transform=None, *, skip_bad=False):
        opened.append((name, root, split))
        return TinySet(n=3, sizes=((32, 48),))

    monkeypatch.setattr(cskd.data, "build_dataset", build_dataset, raising=False)
    monkeypatch.setattr(cskd.data, "build_eval_transform", lambda: None, raising=False)
    return opened


def _checkpoint(tmp_path, config=None):
    torch.manual_seed(0)
    net = build_segmentor("deeplabv3", "mobilenetv2", K)
    path = tmp_path / "run" / "best.pth"
    path.parent.mkdir()
    torch.save({"model": net.state_dict(), "spec": net.spec.to_dict(), "config": config or {},
                "dataset": {"name": "tiny", "num_classes": K, "class_names": list(TinySet.class_names),
                            "palette": [list(c) for c in TinySet.palette]}}, path)
    return net, path


def test_cli_eval_writes_metrics_beside_the_checkpoint(tmp_path, fake_data, capsys) -> None:
    cfg = {"data": {"dataset": "tiny", "root": str(tmp_path / "data"), "val_split": "val"},
           "eval": {"mode": "slide", "crop_size": [16, 16], "stride": None, "scales": [1.0], "flip": False}}
    net, ckpt = _checkpoint(tmp_path, cfg)
    code = main(["eval", str(ckpt), "--device", "cpu", "--workers", "0", "--no-progress", "--flip"])
    out = capsys.readouterr().out
    assert code == 0
    assert fake_data == [("tiny", str(tmp_path / "data"), "val")]
    assert "slide crop 16×16" in out and "flip" in out and "mIoU" in out
    data = json.loads((ckpt.parent / "best_val_slide_flip.json").read_text())
    expected = evaluate(net.eval(), DataLoader(TinySet(n=3, sizes=((32, 48),)), collate_fn=collate_eval),
                        num_classes=K, device="cpu", mode="slide", crop_size=(16, 16), flip=True, progress=False)
    assert data["miou"] == pytest.approx(expected.miou)
    assert data["run"]["split"] == "val" and data["run"]["images"] == 3
    assert (ckpt.parent / "best_val_slide_flip.csv").exists() and (ckpt.parent / "best_val_slide_flip.md").exists()


@pytest.mark.parametrize(("flag", "in_config", "folded"),
                         [("--fold-batchnorm", False, True), (None, True, True), ("--no-fold-batchnorm", True, False)])
def test_cli_eval_folds_batchnorm_on_request_and_scores_the_same(tmp_path, fake_data, capsys, monkeypatch, flag,
                                                                  in_config, folded) -> None:
    import cskd.evaluation

    cfg = {"data": {"dataset": "tiny", "root": "x", "val_split": "val"}, "eval": {"fold_batchnorm": in_config}}
    net, ckpt = _checkpoint(tmp_path, cfg)
    scored = []

    def spy(model, *a, **k):
        scored.append(model)
        return evaluate(model, *a, **k)

    monkeypatch.setattr(cskd.evaluation, "evaluate", spy)
    code = main(["eval", str(ckpt), "--device", "cpu", "--workers", "0", "--no-progress"] + ([flag] if flag else []))
    assert code == 0
    assert ("BatchNorms folded" in capsys.readouterr().out) is folded
    batchnorms = [m for m in scored[0].modules() if isinstance(m, nn.BatchNorm2d)]
    assert (len(batchnorms) == 0) is folded
    data = json.loads((ckpt.parent / "best_val_whole.json").read_text())
    assert data["run"]["fold_batchnorm"] is folded
    expected = evaluate(net.eval(), DataLoader(TinySet(n=3, sizes=((32, 48),)), collate_fn=collate_eval),
                        num_classes=K, device="cpu", progress=False)
    assert data["miou"] == pytest.approx(expected.miou, abs=1e-6)


def test_cli_eval_bare_state_dict_needs_the_architecture(tmp_path, fake_data, capsys) -> None:
    net = build_segmentor("deeplabv3", "mobilenetv2", K)
    bare = tmp_path / "bare.pth"
    torch.save(net.state_dict(), bare)
    assert main(["eval", str(bare), "--dataset", "tiny", "--data-root", "x", "--device", "cpu"]) == 1
    assert "--model" in capsys.readouterr().err
    code = main(["eval", str(bare), "--dataset", "tiny", "--data-root", "x", "--device", "cpu", "--workers", "0",
                 "--model", "deeplabv3", "--backbone", "mobilenetv2", "--out", str(tmp_path / "m"),
                 "--no-progress", "--max-images", "2"])
    assert code == 0 and (tmp_path / "m" / "bare_val_whole.json").exists()
    assert json.loads((tmp_path / "m" / "bare_val_whole.json").read_text())["run"]["images"] == 2


def test_inference_benchmark_runs_on_cpu(tmp_path, capsys) -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_inference", Path(__file__).parents[1] / "benchmarks" / "inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--size", "32", "64", "--iters", "1", "--warmup", "0",
                       "--models", "deeplabv3-mobilenetv2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["crop"]) for r in rows] == [("whole", None), ("slide", [16, 32])]
    assert all(r["median_ms"] > 0 for r in rows)
    assert "| deeplabv3-mobilenetv2 | slide 16×32 | 32×64 |" in capsys.readouterr().out


class SlowSet(TinySet):
    """Each item takes ``delay`` seconds to load, as a slow decode would."""

    def __init__(self, delay: float, **kw) -> None:  # noqa: ANN003
        super().__init__(**kw)
        self.delay = delay

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay)
        return self.items[i]


def test_evaluate_times_the_wait_for_the_loader_after_the_first_batch() -> None:
    net = Pointwise()
    slow: dict[str, float] = {}
    evaluate(net, DataLoader(SlowSet(0.05, n=5), batch_size=1, collate_fn=collate_eval), num_classes=K,
             device="cpu", progress=False, timing=slow)
    assert slow["loader_wait_seconds"] >= 4 * 0.05 * 0.9  # batches 2-5; the first one's wait is its own figure
    assert slow["loader_wait_seconds"] <= 4 / slow["images_per_second"]  # part of the time after the first batch
    ready: dict[str, float] = {}
    evaluate(net, DataLoader(TinySet(n=5), batch_size=1, collate_fn=collate_eval), num_classes=K, device="cpu",
             progress=False, timing=ready)
    assert 0 <= ready["loader_wait_seconds"] < 0.05


def test_evaluate_channels_last_eager_stance_and_timing_keep_the_metrics() -> None:
    net, ds = Pointwise(), TinySet(n=5)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_eval)
    plain = evaluate(net, loader, num_classes=K, device="cpu", progress=False)
    timing: dict[str, float] = {}
    fast = evaluate(net, loader, num_classes=K, device="cpu", progress=False, channels_last=True, compiled=False,
                    timing=timing)
    assert fast.confusion == plain.confusion
    assert timing["images"] == 5 and 0 < timing["first_batch_seconds"] and timing["images_per_second"] > 0
