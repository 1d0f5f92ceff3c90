"""Training data-loader throughput at the Cityscapes crop, and where a sample's time goes.

Makes its own Cityscapes-layout source images with the synthetic generator at 1024×2048 (PNG, like Cityscapes)
in a temporary folder, then

1. times one sample's stages in this process, one thread (what one DataLoader worker does): reading the file,
   decoding the image (torchvision ``decode_image``; Pillow shown for comparison), decoding the label, mapping
   label ids to train ids, and the training augmentation (random scale 0.5–2, crop 512×1024, flip); and a whole
   sample read from the decoded-sample cache (``data.cache``: memory-mapped raw arrays, filled first);
2. runs the real loader: ``build_dataset("synthscapes", …, build_train_transform((512, 1024)))`` in a
   ``DataLoader`` with ``--workers`` processes and batch ``--batch`` and reports images/s after a warm-up.

Wall-clock images/s depends on what else the machine runs; the CPU seconds the DataLoader workers used give a
second figure that does not: ``images / (worker CPU seconds / workers)`` is the rate on otherwise idle cores.

    python benchmarks/data_loader.py                          # 16 source images, 2 workers, batch 8
    python benchmarks/data_loader.py --images 8 --batches 10  # quicker
    python benchmarks/data_loader.py --cache                  # the loader reads the decoded-sample cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from cskd.data import build_dataset, build_train_transform, synthetic
from cskd.data.io import map_label, read_image, read_label


def _median_ms(fn: Callable[[int], object], n: int) -> float:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16, help="source images to generate")
    p.add_argument("--size", nargs=2, type=int, default=(1024, 2048), metavar=("H", "W"), help="source size")
    p.add_argument("--crop", nargs=2, type=int, default=(512, 1024), metavar=("H", "W"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=20, help="timed batches (after 2 warm-up batches)")
    p.add_argument("--cache", action="store_true", help="the real loader reads the decoded-sample cache")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    crop = tuple(args.crop)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        synthetic.generate(tmp, args.images, 0, tuple(args.size), seed=0, workers=args.workers)
        gen_s = time.perf_counter() - t
        transform = build_train_transform(crop)
        ds = build_dataset("synthscapes", tmp, "train", transform)
        raw = build_dataset("synthscapes", tmp, "train")
        n = len(ds)
        paths = ds.samples

        # 1. one sample's stages, one thread
        torch.set_num_threads(1)
        k = min(n, 12)
        stage = {
            "read file": _median_ms(lambda i: paths[i % n].image_path.read_bytes(), k),
            "decode image (torchvision)": _median_ms(lambda i: read_image(paths[i % n].image_path), k),
            "decode image (Pillow, for comparison)": _median_ms(
                lambda i: torch.from_numpy(np.array(Image.open(paths[i % n].image_path).convert("RGB"))
                                           ).permute(2, 0, 1).contiguous(), k),
            "decode label": _median_ms(lambda i: read_label(paths[i % n].label_path), k),
        }
        labels = [read_label(paths[i % n].label_path) for i in range(k)]
        stage["map ids → train ids"] = _median_ms(lambda i: map_label(labels[i], raw.table, "x"), k)
        samples = [raw[i % n] for i in range(k)]
        torch.manual_seed(0)
        stage["augment (scale, crop, flip)"] = _median_ms(lambda i: transform(samples[i]), k)
        stage["whole sample (dataset[i])"] = _median_ms(lambda i: ds[i % n], k)
        cached = build_dataset("synthscapes", tmp, "train", transform, cache=os.path.join(tmp, "cache"))
        stage["fill the cache (decode + write)"] = _median_ms(lambda i: cached.load(i), n)
        stage["whole sample from the cache (dataset[i])"] = _median_ms(lambda i: cached[i % n], k)
        if args.cache:
            ds = cached

        # 2. the real loader
        sampler = RandomSampler(ds, replacement=True, num_samples=args.batch * (args.batches + 2))
        loader = DataLoader(ds, batch_size=args.batch, sampler=sampler, num_workers=args.workers, drop_last=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        it = iter(loader)
        for _ in range(2):
            batch = next(it)
        t = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        loader_s = time.perf_counter() - t
        assert batch["image"].shape == (args.batch, 3, *crop) and batch["image"].dtype == torch.uint8
        del it  # joins the workers, so their CPU time is counted below
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    total_images = (args.batches + 2) * args.batch  # every sampled image was loaded, warm-up included
    idle_ips = total_images / (cpu / args.workers) if args.workers > 0 and cpu > 0 else None

    ips = args.batches * args.batch / loader_s
    decode = stage["decode image (torchvision)"] + stage["decode label"] + stage["read file"]
    augment = stage["map ids → train ids"] + stage["augment (scale, crop, flip)"]
    res = {
        "source": list(args.size), "crop": list(crop), "workers": args.workers, "batch": args.batch,
        "cpus": os.cpu_count(), "cache": args.cache, "images_per_s": round(ips, 1),
        "worker_cpu_s": round(cpu, 2), "images_per_s_idle_cores": round(idle_ips, 1) if idle_ips else None,
        "stage_ms": {k: round(v, 1) for k, v in stage.items()},
        "decode_share": round(decode / (decode + augment), 3), "generation_s": round(gen_s, 1),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
    }
    h, w = args.size
    print(f"DataLoader, synthscapes PNG {h}×{w} → train crop {crop[0]}×{crop[1]}, batch {args.batch}, "
          f"{args.workers} workers on {os.cpu_count()} CPUs{', from the cache' if args.cache else ''}: "
          f"{ips:.1f} images/s "
          f"({1e3 * loader_s / args.batches:.0f} ms per batch)")
    if idle_ips:
        print(f"worker CPU time {cpu:.1f} s for {total_images} images → {idle_ips:.1f} images/s on {args.workers} "
              "idle cores")
    print("one sample, one thread (median):")
    for name, ms in stage.items():
        print(f"  {name:<40} {ms:7.1f} ms")
    print(f"decode (file + image + label) {decode:.1f} ms vs augment (ids + transform) {augment:.1f} ms: "
          f"{100 * res['decode_share']:.0f}% decode")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
