"""Inference throughput of the students at Cityscapes size: whole-image and sliding-window modes.

Times what evaluation runs per image: ``predict_logits`` (forward, logits resized to the full image, windows
averaged) plus the ``argmax``, on an already normalised image resident on the device (decoding and the copy to
the GPU are excluded). Weights are random (BatchNorm statistics set from noise, see ``calibrate_bn``): speed does
not depend on their values.

GPU (the reported figures)::

    python benchmarks/inference.py --out benchmarks/results/inference_gpu.json

runs 1024×2048, batch 1, bf16 autocast, channels-last, CUDA-event timing (median of --iters after --warmup).
CPU smoke run (seconds)::

    python benchmarks/inference.py --device cpu --size 128 256 --iters 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from cskd.evaluation import predict_logits, resolve_amp
from cskd.models import build_segmentor
from cskd.timing import cpu_name, time_calls

MODELS = {"deeplabv3-resnet18": ("deeplabv3", "resnet18"), "deeplabv3-mobilenetv2": ("deeplabv3", "mobilenetv2")}
MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="image size (default 1024 2048 on CUDA, 128 256 on CPU)")
    p.add_argument("--crop", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="slide window (default: half the image per side, 512×1024 at Cityscapes size)")
    p.add_argument("--stride", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="slide step (default: 2/3 of the window, rounded up)")
    p.add_argument("--modes", nargs="+", default=["whole", "slide"], choices=["whole", "slide", "msflip"],
                   help="msflip = whole image at scales 0.5–1.75 plus flips (12 forward passes)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA, none on CPU), bf16, fp16, none")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def calibrate_bn(net: torch.nn.Module, device: torch.device) -> None:
    """Set BatchNorm statistics from one batch of noise. With the initial statistics (mean 0, variance 1) a random
    network's activations can shrink layer after layer into denormal floats, which CPUs process many times slower
    (seen here: 3 s instead of 30 ms for one MobileNetV2 pass); trained weights do not do that."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: this one batch
    with torch.no_grad():
        net.train()(torch.randn(2, 3, 128, 256, device=device))
    net.eval()


def _mode_kwargs(mode: str, crop: tuple[int, int], stride: tuple[int, int] | None) -> dict[str, Any]:
    if mode == "slide":
        return {"mode": "slide", "crop_size": crop, "stride": stride}
    if mode == "msflip":
        return {"mode": "whole", "scales": MS_SCALES, "flip": True}
    return {"mode": "whole"}


def time_mode(net: torch.nn.Module, x: torch.Tensor, kwargs: dict[str, Any], amp: torch.dtype | None,
              warmup: int, iters: int) -> list[float]:
    """Per-iteration milliseconds."""
    cuda = x.device.type == "cuda"

    def once() -> torch.Tensor:
        return predict_logits(net, x, amp_dtype=amp, **kwargs).argmax(1)

    with torch.inference_mode():
        times, _ = time_calls(once, warmup=warmup, iters=iters, cuda=cuda)
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    h, w = args.size or ((1024, 2048) if cuda else (128, 256))
    crop = tuple(args.crop) if args.crop else (h // 2, w // 2)
    stride = tuple(args.stride) if args.stride else None
    amp = resolve_amp(args.amp, device)
    channels_last = cuda and not args.no_channels_last
    x = torch.randn(args.batch, 3, h, w, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    rows = []
    for name in args.models:
        model, backbone = MODELS[name]
        net = build_segmentor(model, backbone, args.num_classes).to(device)
        calibrate_bn(net, device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        for mode in args.modes:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            ms = time_mode(net, x, _mode_kwargs(mode, crop, stride), amp, args.warmup, args.iters)
            med = statistics.median(ms)
            rows.append({
                "model": name, "mode": mode, "size": [h, w], "batch": args.batch,
                "crop": list(crop) if mode == "slide" else None,
                "median_ms": round(med, 3), "min_ms": round(min(ms), 3),
                "images_per_s": round(1000 * args.batch / med, 2),
                "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
            })
            print(f"{name:24s} {mode:6s} {med:9.2f} ms  {rows[-1]['images_per_s']:8.2f} img/s", file=sys.stderr)

    env = {
        "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "torch": torch.__version__, "amp": str(amp).replace("torch.", "") if amp else "fp32",
        "channels_last": channels_last, "threads": torch.get_num_threads(), "warmup": args.warmup,
        "iters": args.iters, "stride": list(stride) if stride else "2/3 of crop",
    }
    print(f"\n{env['device']}, torch {env['torch']}, {env['amp']}, channels_last={channels_last}, "
          f"batch {args.batch}, median of {args.iters} after {args.warmup} warm-up\n")
    print("| model | mode | input | ms / batch | images / s | peak GPU mem (GiB) |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        mode = r["mode"] + (f" {r['crop'][0]}×{r['crop'][1]}" if r["crop"] else "")
        mem = "" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        print(f"| {r['model']} | {mode} | {h}×{w} | {r['median_ms']:.1f} | {r['images_per_s']:.2f} | {mem} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
