"""Each kernel-level change of the distillation step timed on its own, before and after, at the step's shapes.

- ``ce``: the cross-entropy of the upsampled logits (main head), forward + backward, eager and compiled
  (:meth:`cskd.engine.step.StepModule.compile_ce`);
- ``teacher``: the frozen, BN-folded teacher's forward, compiled, without and with its conv epilogues fused into
  cuDNN's calls (:func:`cskd.models.epilogue.fuse_conv_epilogues_`), and the largest output difference.

Prints a Markdown table; ``--out`` writes JSON.

    python benchmarks/kernel_levers.py --out kernel_levers.json                      # H200: B = 8, 512×1024
    python benchmarks/kernel_levers.py --device cpu --batch 1 --size 64 128 --iters 2 --warmup 1 --teacher resnet50
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cskd.engine.step import _upsampled_ce, segmentation_ce
from cskd.models.epilogue import fuse_conv_epilogues_
from cskd.models.fusion import fold_batchnorm_
from cskd.models.segmentor import build_segmentor
from cskd.timing import time_calls


def _median_ms(fn: Callable[[], Any], args: argparse.Namespace, cuda: bool) -> float:
    ms, _ = time_calls(fn, warmup=args.warmup, iters=args.iters, cuda=cuda)
    return statistics.median(ms)


def _layout(x: Tensor, cuda: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cuda else x


def ce_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    h, w = args.size
    logits = torch.randn(args.batch, args.classes, h // 8, w // 8, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, args.classes, (args.batch, h, w), device=device)
    targets[:, : h // 10] = 255
    compiled = torch.compile(_upsampled_ce, dynamic=False)
    rows = []
    for name, fn in (("eager", None), ("compiled", compiled)):
        rows.append({"lever": "ce", "variant": name,
                     "ms": _median_ms(lambda f=fn: segmentation_ce(logits, targets, f).backward(), args, cuda)})
    return rows


def teacher_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    teacher = build_segmentor("deeplabv3", args.teacher, args.classes, aux=False).eval().requires_grad_(False)
    fold_batchnorm_(teacher)
    fused = copy.deepcopy(teacher)
    n = fuse_conv_epilogues_(fused)
    x = _layout(torch.randn(args.batch, 3, *args.size, device=device, dtype=dtype), cuda)
    rows, outs = [], []
    for name, net in (("unfused", teacher), (f"fused ({n} convs)", fused)):
        net = net.to(device, dtype=dtype)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        run = torch.compile(net)
        with torch.no_grad():
            outs.append(run(x).logits.float())
            rows.append({"lever": "teacher", "variant": name,
                         "ms": _median_ms(lambda r=run: r(x), args, cuda)})
    scale = outs[0].abs().max().item()
    rows[-1]["max_abs_diff"] = (outs[0] - outs[1]).abs().max().item()
    rows[-1]["max_abs_logit"] = scale
    return rows


LEVERS = {"ce": ce_rows, "teacher": teacher_rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=(512, 1024))
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--teacher", default="resnet101")
    p.add_argument("--levers", default=",".join(LEVERS))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cudnn.benchmark = True
    rows: list[dict[str, Any]] = []
    for lever in args.levers.split(","):
        rows += LEVERS[lever](args, device, dtype)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "batch": args.batch, "size": list(args.size), "dtype": str(dtype)}
    print(f"{env['device']}, torch {env['torch']}, B={args.batch}, {args.size[0]}×{args.size[1]}, {dtype}\n")
    print("| lever | variant | ms p50 | note |\n|---|---|---|---|")
    for r in rows:
        note = (f"max |Δ logits| {r['max_abs_diff']:.3g} of max |logit| {r['max_abs_logit']:.3g}"
                if "max_abs_diff" in r else "")
        print(f"| {r['lever']} | {r['variant']} | {r['ms']:.3f} | {note} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
