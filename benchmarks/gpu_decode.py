"""Training loader + ``prepare`` throughput with JPEGs decoded by the loader workers (``data.decode: cpu``) or on
the GPU (``data.decode: gpu``), on generated full-resolution JPEGs.

1. Writes ``--images`` synthetic street scenes of ``--size`` as JPEGs (``--quality``) with PNG labels in the VOC
   layout (``JPEGImages/``, ``SegmentationClassAug/``, ``train_aug.txt``) into ``--data`` (kept and reused when
   given; a temporary folder otherwise). Every 16th image is greyscale, as in COCO and ADE20K; ``--progressive``
   is the share written as progressive JPEGs (nvJPEG decodes those on its hybrid path, Huffman on the host, in the
   training process: the slow case).
2. For each of ``--modes``, builds the training data exactly as the Trainer does for that ``data.decode``
   (dataset, transform, ``SeededSamples``, ``SeededBatchSampler``, a DataLoader with ``--workers`` workers,
   pin_memory on CUDA, 4 batches prefetched per worker) and times ``--batches`` batches of: next batch, then what
   ``StepRunner.prepare`` does (``decode_batch`` for an encoded batch, else the copy; masks copied; normalise),
   then optionally ``--step-ms`` of simulated GPU step (``torch.cuda._sleep``: the host runs ahead while the
   device is busy, as in training), after ``--warmup`` batches (default: enough to drain the prefetch queue).
   Reported: images/s; the main thread's CPU ms per batch (GPU decoding moves work into the training process,
   where it competes with the kernel launches); the workers' CPU ms per image.
3. Checks that both modes give the same batches: for the first ``--check`` batches, the same keys through both
   paths: labels must be identical, images equal up to the decoders (max / mean absolute difference reported).
4. ``--race-check`` (CUDA): queues ~``--race-ms`` of work and reductions that read freshly freed tensors, then
   decodes; a reduction with a wrong value means the decoder wrote into memory the training stream was still
   reading. Run for ``decode_batch`` (side stream, must be 0) and for a plain ``decode_jpeg`` on the current
   stream (the control: shows the harness can see the hazard).

    python benchmarks/gpu_decode.py --device cuda --images 256 --workers 14 --out gpu_decode.json --race-check
    python benchmarks/gpu_decode.py --device cuda --size 1024 2048 --crop 512 1024 --images 128 --workers 14
    python benchmarks/gpu_decode.py --device cpu --images 8 --size 120 160 --crop 64 64 --batch 4 --batches 3 \\
        --workers 0 --check 1    # smoke run: "gpu" is then the encoded path decoded on the CPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

import cskd.data.gpu_decode as gpu_decode
from cskd.data import build_dataset, build_train_transform, normalize
from cskd.data.gpu_decode import decode_batch, is_encoded
from cskd.data.synthetic import render_sample
from cskd.data.workers import iterate
from cskd.engine.sampling import SeededBatchSampler, SeededSamples
from cskd.timing import cpu_name

PREFETCH = 4  # as the Trainer (cskd.engine.trainer.PREFETCH_BATCHES)


def _write_one(task: tuple[str, int, tuple[int, int], int, bool]) -> int:
    root, k, size, quality, progressive = task
    img, lab = render_sample(0, "train", k, size)
    voc = Path(root) / "VOC2012"
    im = Image.fromarray(img)
    if k % 16 == 15:
        im = im.convert("L")
    im.save(voc / "JPEGImages" / f"{k:06d}.jpg", quality=quality, progressive=progressive)
    Image.fromarray((lab % 21).astype(np.uint8)).save(voc / "SegmentationClassAug" / f"{k:06d}.png")
    return (voc / "JPEGImages" / f"{k:06d}.jpg").stat().st_size


def make_data(root: Path, n: int, size: tuple[int, int], quality: int, progressive: float = 0.0) -> float:
    """The VOC-layout tree (reused when it holds the same images); returns the mean JPEG size in kB."""
    voc = root / "VOC2012"
    stamp = voc / "benchmark.json"
    want = {"n": n, "size": list(size), "quality": quality, "progressive": progressive}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        files = sorted((voc / "JPEGImages").glob("*.jpg"))
        return sum(f.stat().st_size for f in files) / len(files) / 1e3
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    every = round(1 / progressive) if progressive > 0 else 0
    tasks = [(str(root), k, size, quality, bool(every) and k % every == 0) for k in range(n + 1)]
    with mp.get_context("fork").Pool(max(1, min(os.cpu_count() or 1, 16))) as pool:
        sizes = pool.map(_write_one, tasks)
    ids = [f"{k:06d}" for k in range(n + 1)]
    (voc / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(ids[:n]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text(ids[n] + "\n")
    stamp.write_text(json.dumps(want))
    return sum(sizes[:n]) / n / 1e3


def train_set(root: Path, mode: str, crop: tuple[int, int], seed: int = 0) -> SeededSamples:
    """The training samples as the Trainer builds them for ``data.decode`` resolved to ``mode``."""
    ds = build_dataset("voc", root, "train")
    if mode == "gpu":
        ds = ds.with_encoded_images()
    return SeededSamples(ds, build_train_transform(crop, (0.5, 2.0), True, encoded=mode == "gpu"), seed)


def loader(samples: SeededSamples, batch: int, workers: int, device: torch.device, seed: int = 0) -> DataLoader:
    return DataLoader(samples, batch_sampler=SeededBatchSampler(len(samples), batch, seed),
                      num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=PREFETCH if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))


def prepare(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StepRunner.prepare`` does with a batch (channels_last left out)."""
    images = decode_batch(batch, device) if is_encoded(batch) else batch["image"].to(device, non_blocking=True)
    masks = batch["mask"].to(device, non_blocking=True).long()
    return normalize(images), masks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sleep_cycles_per_ms(device: torch.device) -> float:
    """``torch.cuda._sleep`` cycles per millisecond on this GPU (timed once)."""
    torch.cuda._sleep(1000)
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def time_mode(root: Path, mode: str, args: argparse.Namespace, device: torch.device,
              step_cycles: int) -> dict[str, Any]:
    samples = train_set(root, mode, tuple(args.crop))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    batches = iterate(loader(samples, args.batch, args.workers, device))
    warmup = args.warmup if args.warmup is not None else args.workers * PREFETCH + 2
    for _ in range(warmup):
        prepare(next(batches), device)
    sync(device)
    wall, thread = time.perf_counter(), time.thread_time()
    proc = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.batches):
        x, _ = prepare(next(batches), device)
        if step_cycles:
            torch.cuda._sleep(step_cycles)
    sync(device)
    wall, thread = time.perf_counter() - wall, time.thread_time() - thread
    proc_after = resource.getrusage(resource.RUSAGE_SELF)
    assert x.shape == (args.batch, 3, *args.crop)
    del batches  # stops the workers, so that their CPU time is counted
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    images = args.batch * args.batches
    worker_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "mode": mode, "images_per_s": round(images / wall, 1), "ms_per_batch": round(1e3 * wall / args.batches, 2),
        "main_thread_cpu_ms_per_batch": round(1e3 * thread / args.batches, 2),
        "main_process_cpu_ms_per_batch": round(1e3 * ((proc_after.ru_utime + proc_after.ru_stime)
                                                      - (proc.ru_utime + proc.ru_stime)) / args.batches, 2),
        "worker_cpu_ms_per_image": round(1e3 * worker_cpu / ((warmup + args.batches) * args.batch), 2)
        if args.workers else None,
    }


def compare_modes(root: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The same keys through both paths: labels identical, images up to the decoders."""
    cpu = iterate(DataLoader(train_set(root, "cpu", tuple(args.crop)),
                             batch_sampler=SeededBatchSampler(args.images, args.batch, 0)))
    enc = iterate(DataLoader(train_set(root, "gpu", tuple(args.crop)),
                             batch_sampler=SeededBatchSampler(args.images, args.batch, 0)))
    diffs, masks_equal = [], True
    for _ in range(args.check):
        a, e = next(cpu), next(enc)
        assert a["name"] == e["name"]
        masks_equal &= torch.equal(a["mask"], e["mask"])
        diffs.append((decode_batch(e, device).cpu().int() - a["image"].int()).abs().flatten())
    d = torch.cat(diffs).float()
    return {"batches": args.check, "masks_identical": bool(masks_equal), "max_abs_diff": int(d.max()),
            "mean_abs_diff": round(float(d.mean()), 3), "share_over_8": round(float((d > 8).float().mean()), 5),
            "p99_abs_diff": float(torch.quantile(d[:: max(1, d.numel() // 1_000_000)], 0.99))}


def race_check(root: Path, args: argparse.Namespace, device: torch.device, cycles_per_ms: float) -> dict[str, int]:
    """How often a decode overwrote memory that queued kernels of the training stream were still to read."""
    from torchvision.io import ImageReadMode, decode_jpeg

    batch = next(iterate(DataLoader(train_set(root, "gpu", tuple(args.crop)),
                                    batch_sampler=SeededBatchSampler(args.images, args.batch, 0))))
    shapes = [(3, int(r[0]), int(r[1])) for r in batch["image_plan"].tolist()]
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch["image_encoded"]]

    def plain() -> None:
        decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)

    out = {}
    for name, decode in (("decode_batch (side stream)", lambda: decode_batch(batch, device)),
                         ("plain decode_jpeg (control)", plain)):
        bad = 0
        for it in range(args.race_iters):
            victims = [torch.full(s, (7 * i + it) % 200 + 1, dtype=torch.uint8, device=device)
                       for i, s in enumerate(shapes)]
            sync(device)
            torch.cuda._sleep(int(args.race_ms * cycles_per_ms))
            sums = [v.sum(dtype=torch.int64) for v in victims]
            want = [((7 * i + it) % 200 + 1) * v.numel() for i, v in enumerate(victims)]
            del victims  # freed while the reductions are still queued behind the sleep
            decode()
            sync(device)
            bad += any(int(s) != w for s, w in zip(sums, want))
        out[name] = bad
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="e.g. " + __doc__.split("\n\n")[-1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--data", help="folder for the generated JPEGs (kept, and reused when it matches)")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--size", nargs=2, type=int, default=(480, 640), metavar=("H", "W"),
                   help="source size (480×640: COCO's; ADE20K and VOC are about 512×683 and 375×500)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--progressive", type=float, default=0.0, help="share of progressive JPEGs (0-1)")
    p.add_argument("--crop", nargs=2, type=int, default=(512, 512), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=8, help="per GPU (the recipes: 16 over 2 GPUs)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batches", type=int, default=50, help="timed batches")
    p.add_argument("--warmup", type=int, help="untimed batches first (default: workers × 4 + 2)")
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated GPU step per batch (CUDA)")
    p.add_argument("--modes", default="cpu,gpu")
    p.add_argument("--check", type=int, default=4, help="batches compared between the modes (0: none)")
    p.add_argument("--race-check", action="store_true")
    p.add_argument("--race-iters", type=int, default=100)
    p.add_argument("--race-ms", type=float, default=50.0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        gpu_decode._ALLOW_CPU_DEVICE = True  # the encoded path, decoded on the CPU: a smoke run
    if device.type != "cuda" and (args.step_ms or args.race_check):
        p.error("--step-ms and --race-check need a CUDA device")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "voc"
        t = time.perf_counter()
        kb = make_data(root, args.images, tuple(args.size), args.quality, args.progressive)
        print(f"{args.images} JPEG scenes {args.size[0]}×{args.size[1]} (quality {args.quality}, {kb:.0f} kB on "
              f"average) in {root} ({time.perf_counter() - t:.0f} s)", flush=True)
        paths = [s.image_path for s in build_dataset("voc", root, "train").samples]
        resolved = gpu_decode.resolve_decode("gpu", device, paths)  # probes nvJPEG on CUDA
        assert resolved == "gpu"
        cycles = sleep_cycles_per_ms(device) if device.type == "cuda" else 0.0
        step_cycles = int(args.step_ms * cycles)
        rows = [time_mode(root, mode, args, device, step_cycles) for mode in args.modes.split(",")]
        check = compare_modes(root, args, device) if args.check else None
        race = race_check(root, args, device, cycles) if args.race_check else None

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    res = {"device": name, "cpus": os.cpu_count(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "python": platform.python_version(),
           "source": list(args.size), "jpeg_kb": round(kb, 1), "progressive": args.progressive,
           "crop": list(args.crop), "batch": args.batch, "workers": args.workers, "step_ms": args.step_ms,
           "modes": rows, "check": check, "race": race,
           "refused_by_nvjpeg": dict(gpu_decode._refused)}
    print(f"\n{name}: JPEG {args.size[0]}×{args.size[1]} → crop {args.crop[0]}×{args.crop[1]}, batch {args.batch}, "
          f"{args.workers} workers, {args.batches} batches" + (f", {args.step_ms} ms simulated step" if
                                                              args.step_ms else ""))
    for r in rows:
        worker = f", workers {r['worker_cpu_ms_per_image']} CPU ms/image" if r["worker_cpu_ms_per_image"] else ""
        print(f"  decode {r['mode']}: {r['images_per_s']:8.1f} img/s, {r['ms_per_batch']:7.2f} ms/batch; main "
              f"thread {r['main_thread_cpu_ms_per_batch']} CPU ms/batch (process "
              f"{r['main_process_cpu_ms_per_batch']}){worker}")
    if check:
        print(f"  same keys, gpu vs cpu: labels {'identical' if check['masks_identical'] else 'DIFFER'}; images max "
              f"|diff| {check['max_abs_diff']}, mean {check['mean_abs_diff']}, p99 {check['p99_abs_diff']}, "
              f"{100 * check['share_over_8']:.3f} % over 8 levels")
    if race:
        for k, v in race.items():
            print(f"  race check, {k}: {v}/{args.race_iters} iterations corrupted")
    if gpu_decode._refused:
        print(f"  nvJPEG refused {len(gpu_decode._refused)} file(s): {gpu_decode._refused}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    ok = check is None or check["masks_identical"]
    ok &= race is None or race["decode_batch (side stream)"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
