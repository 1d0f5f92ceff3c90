"""CPU time of the training augmentation per sample at the Cityscapes geometry: the engine's crop-window-first
path (:class:`cskd.data.RandomScaleCrop` + flip) against the textbook resize-the-whole-image-then-crop pipeline
(the independent reference in ``tests/test_data_augment_reference.py``), on the same draws.

One thread (what one DataLoader worker has), synthetic 1024×2048 street scenes, scale 0.5-2, crop 512×1024.

    python benchmarks/augment.py                  # 4 source images, 64 draws per path
    python benchmarks/augment.py --draws 200 --out augment.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from cskd.data import RandomScaleCrop, synthetic
from cskd.data.info import CITYSCAPES_TABLE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_data_augment_reference import reference_apply, reference_draw  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", nargs=2, type=int, default=(1024, 2048), metavar=("H", "W"))
    p.add_argument("--crop", nargs=2, type=int, default=(512, 1024), metavar=("H", "W"))
    p.add_argument("--scale", nargs=2, type=float, default=(0.5, 2.0), metavar=("LO", "HI"))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--draws", type=int, default=64, help="timed samples per path (same seeds for both)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    size, crop, scales = tuple(args.size), tuple(args.crop), tuple(args.scale)
    samples = []
    for i in range(args.images):
        img, lab = synthetic.render_sample(0, "train", i, size)
        samples.append({"image": tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous()),
                        "mask": tv_tensors.Mask(torch.from_numpy(CITYSCAPES_TABLE.to_train[lab]))})
    fast = v2.Compose([RandomScaleCrop(crop, scales), v2.RandomHorizontalFlip(0.5)])

    def textbook(sample: dict) -> dict:
        return reference_apply(sample, reference_draw(*size, crop, scales), crop)

    times: dict[str, list[float]] = {"resize whole, then crop": [], "crop window, resize it only (cskd)": []}
    for k in range(args.draws):  # interleaved, so that machine load hits both alike
        for name, fn in zip(times, (textbook, fast)):
            torch.manual_seed(k)
            t = time.perf_counter()
            out = fn(samples[k % len(samples)])
            times[name].append(1e3 * (time.perf_counter() - t))
            assert out["image"].shape == (3, *crop)
    res = {name: {"median_ms": statistics.median(v), "mean_ms": statistics.fmean(v)} for name, v in times.items()}
    print(f"augmentation per sample, {size[0]}×{size[1]} → {crop[0]}×{crop[1]}, scale {scales[0]}-{scales[1]}, "
          f"flip, 1 thread, {args.draws} draws (same seeds):")
    for name, r in res.items():
        print(f"  {name:<38} median {r['median_ms']:6.1f} ms   mean {r['mean_ms']:6.1f} ms")
    old, new = (r["mean_ms"] for r in res.values())
    print(f"mean speed-up {old / new:.1f}×")
    if args.out:
        Path(args.out).write_text(json.dumps({"size": size, "crop": crop, "scale": scales, "draws": args.draws,
                                              "paths": res, "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
