"""Each kernel-level change of the distillation step timed on its own, before and after, at the step's shapes.

- ``ce``: the cross-entropy of the upsampled logits (main head), forward + backward, eager, compiled
  (:meth:`cskd.engine.step.StepModule.compile_ce`) and, where Triton runs, fused (``train.fused_ce``), with the
  loss's difference from the eager one;
- ``teacher``: the frozen, BN-folded teacher's forward, compiled, without and with its conv epilogues fused into
  cuDNN's calls (:func:`cskd.models.epilogue.fuse_conv_epilogues_`), and the largest output difference;
- ``aspp``: DeepLabV3's three dilated ASPP convolutions (d = 12, 24, 36), compiled: the teacher's (2048 → 256,
  bias + ReLU, forward, its epilogue in cuDNN's call as the fused teacher runs it) and the student's (512 → 256,
  forward + backward under autocast), the library's dilated kernel against ``train.dilated_convs: row_taps``
  (:mod:`cskd.models.atrous`);
- ``pool``: the student stem's max-pool, compiled against the Triton kernels (``train.fused_maxpool``);
- ``metric``: validation's confusion-matrix update, one set of bins against ``ConfusionMatrix.lanes`` copies
  (run it at the validation's shape: ``--levers metric --batch 1 --size 1024 2048``).

A lever that fails (a compiler error, say) is reported as such and the others still run and print.

Prints a Markdown table; ``--out`` writes JSON.

    python benchmarks/kernel_levers.py --out kernel_levers.json                      # H200: B = 8, 512×1024
    python benchmarks/kernel_levers.py --device cpu --batch 1 --size 64 128 --iters 2 --warmup 1 --teacher resnet50
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from cskd._triton import available as triton_available
from cskd.constants import IGNORE_INDEX
from cskd.engine import fused_ce
from cskd.engine.fused_ce import fused_upsampled_ce
from cskd.engine.step import _upsampled_ce, segmentation_ce
from cskd.evaluation.metrics import ConfusionMatrix
from cskd.models.atrous import row_taps_dilated_
from cskd.models.epilogue import ConvReLU, fuse_conv_epilogues_
from cskd.models.fusion import fold_batchnorm_
from cskd.models import maxpool
from cskd.models.maxpool import TritonMaxPool
from cskd.models.segmentor import build_segmentor
from cskd.timing import time_calls


def _median_ms(fn: Callable[[], Any], args: argparse.Namespace, cuda: bool) -> float:
    ms, _ = time_calls(fn, warmup=args.warmup, iters=args.iters, cuda=cuda)
    return statistics.median(ms)


def _layout(x: Tensor, cuda: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cuda else x


def _rel_diff(a: Tensor, b: Tensor) -> dict[str, float]:
    return {"max_abs_diff": (a.float() - b.float()).abs().max().item(), "max_abs_logit": a.float().abs().max().item()}


def ce_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    h, w = args.size
    logits = torch.randn(args.batch, args.classes, h // 8, w // 8, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, args.classes, (args.batch, h, w), device=device)
    targets[:, : h // 10] = 255
    variants: list[tuple[str, Callable[..., Tensor] | None]] = [
        ("eager", None), ("compiled", torch.compile(_upsampled_ce, dynamic=False))]
    if triton_available(device):  # the default number of warps first
        for warps in dict.fromkeys((fused_ce.NUM_WARPS, 4, 8)):
            variants.append((f"fused (train.fused_ce), {warps} warps", functools.partial(_fused_with, warps=warps)))
        # the previous tiling: each run of output columns in one tile of the next power of two (16 lanes for 9)
        variants.append((f"fused, one padded tile per run, {fused_ce.NUM_WARPS} warps",
                         functools.partial(_fused_with, warps=fused_ce.NUM_WARPS, lanes=_padded_lanes)))
    rows = []
    losses, grads = [], []
    for name, fn in variants:
        logits.grad = None
        loss = segmentation_ce(logits, targets, fn)
        loss.backward()
        losses.append(loss.detach())
        grads.append(logits.grad.clone())
        rows.append({"lever": "ce", "variant": name,
                     "ms": _median_ms(lambda f=fn: segmentation_ce(logits, targets, f).backward(), args, cuda)})
        if len(losses) > 1:
            rows[-1].update(_rel_diff(losses[0], losses[-1]))
            rows[-1]["max_abs_grad_diff"] = (grads[-1].float() - grads[0].float()).abs().max().item()
    return rows


def _fused_with(*args: Tensor, warps: int, lanes: Callable[[int], tuple[int, int]] | None = None) -> Tensor:
    default = fused_ce.NUM_WARPS, fused_ce._lanes
    fused_ce.NUM_WARPS = warps
    fused_ce._lanes = lanes or default[1]
    try:
        return fused_upsampled_ce(*args)
    finally:
        fused_ce.NUM_WARPS, fused_ce._lanes = default


def _padded_lanes(max_run: int) -> tuple[int, int]:
    return max(2, 1 << (max(max_run, 1) - 1).bit_length()), 0


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
    rows[-1].update(_rel_diff(outs[0], outs[1]))
    return rows


def aspp_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    h, w = args.size[0] // 8, args.size[1] // 8
    rows = []
    for who, cin in (("teacher", 2048), ("student", 512)):
        x = _layout(torch.randn(args.batch, cin, h, w, device=device, dtype=dtype), cuda)
        gy = _layout(torch.randn(args.batch, 256, h, w, device=device, dtype=dtype), cuda)
        for d in (12, 24, 36):
            conv = torch.nn.Conv2d(cin, 256, 3, padding=d, dilation=d).to(device)
            outs = []
            for variant in ("native", "row_taps"):
                net = copy.deepcopy(conv)
                if variant == "row_taps":
                    row_taps_dilated_(net)
                if who == "teacher":  # frozen, in the autocast dtype, its ReLU in cuDNN's call where it can be
                    net = net.to(dtype).requires_grad_(False)
                    if variant == "native":
                        net.__class__ = ConvReLU
                        fn = torch.compile(net)
                    else:
                        fn = torch.compile(lambda t, n=net: torch.relu(n(t)))

                    def call(f=fn) -> Tensor:
                        with torch.no_grad():
                            return f(x)
                else:  # trained: float32 weights under autocast, forward + backward
                    xg = x.detach().requires_grad_()
                    fn = torch.compile(net)

                    def call(f=fn, xg=xg) -> Tensor:
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                            y = f(xg)
                        y.backward(gy)
                        return y
                outs.append(call().detach())
                rows.append({"lever": f"aspp {who}", "variant": f"d={d} {variant}", "ms": _median_ms(call, args, cuda)})
            rows[-1].update(_rel_diff(outs[0], outs[1]))
    return rows


def pool_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """The student stem's 3×3/2 max-pool, forward + backward on its ReLU'd input (B × 128 × H/2 × W/2): compiled
    (inductor's argmax-recomputing backward), and the Triton kernels (train.fused_maxpool)."""
    cuda = device.type == "cuda"
    h, w = args.size
    x = _layout(torch.randn(args.batch, 128, h // 2, w // 2, device=device).relu().to(dtype), cuda).requires_grad_()
    gy = _layout(torch.randn(args.batch, 128, h // 4, w // 4, device=device, dtype=dtype), cuda)
    variants: list[tuple[str, Callable[[Tensor], Tensor]]] = [
        ("compiled nn.MaxPool2d", torch.compile(nn.MaxPool2d(3, 2, 1)))]
    if triton_available(device):  # the default block first
        for block in dict.fromkeys((maxpool.BLOCK_X, 16, 32)):
            variants.append((f"Triton (train.fused_maxpool), {block} columns per program",
                             functools.partial(_pool_with, block=block)))
    rows, outs = [], []
    for name, pool in variants:
        x.grad = None
        y = pool(x)
        y.backward(gy)
        outs.append((y.detach(), x.grad.clone()))
        rows.append({"lever": "pool", "variant": name,
                     "ms": _median_ms(lambda p=pool: p(x).backward(gy), args, cuda)})
        if len(outs) > 1:
            rows[-1].update(_rel_diff(outs[0][0], outs[-1][0]))
            rows[-1]["max_abs_grad_diff"] = (outs[-1][1].float() - outs[0][1].float()).abs().max().item()
    return rows


def _pool_with(x: Tensor, block: int) -> Tensor:
    default = maxpool.BLOCK_X
    maxpool.BLOCK_X = block
    try:
        return TritonMaxPool()(x)
    finally:
        maxpool.BLOCK_X = default


def metric_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """One confusion-matrix update of validation (B × H × W class ids against labels, 10 % ignored): the scatter
    into one set of bins against ``ConfusionMatrix.lanes`` copies, for predictions from one class (a random-weight
    model), skewed (class c drawn with weight 0.7^c) and uniform. The matrices must be equal."""
    b, (h, w), k = args.batch, args.size, args.classes
    weights = {"one class": torch.eye(k)[3], "skewed": 0.7 ** torch.arange(k, dtype=torch.float),
               "uniform": torch.ones(k)}
    gen = torch.Generator().manual_seed(0)
    target = torch.multinomial(weights["skewed"], b * h * w, replacement=True, generator=gen).view(b, h, w)
    target[torch.rand(b, h, w, generator=gen) < 0.1] = IGNORE_INDEX
    target = target.to(device=device, dtype=torch.uint8)
    rows = []
    for dist, weight in weights.items():
        pred = torch.multinomial(weight, b * h * w, replacement=True, generator=gen).view(b, h, w).to(device)
        first = None
        for lanes in (1, ConfusionMatrix.lanes):
            cm = ConfusionMatrix(k, device=device, check_each_update=False)
            cm.lanes = lanes
            cm.update(pred, target)
            mat = cm.mat.clone()
            rows.append({"lever": "metric", "variant": f"{dist}, {lanes} set{'s' if lanes > 1 else ''} of bins",
                         "ms": _median_ms(lambda c=cm: c.update(pred, target), args, device.type == "cuda")})
            if first is None:
                first = mat
            else:
                rows[-1].update({"max_abs_diff": (mat - first).abs().max().item(),
                                 "max_abs_logit": first.max().item()})
    return rows


LEVERS = {"ce": ce_rows, "teacher": teacher_rows, "aspp": aspp_rows, "pool": pool_rows, "metric": metric_rows}


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
    failed = []
    for lever in args.levers.split(","):
        try:
            rows += LEVERS[lever](args, device, dtype)
        except Exception as e:  # noqa: BLE001 - report it, keep the other levers' timings
            first_line = next(iter(str(e).strip().splitlines()), "")
            failed.append({"lever": lever, "error": f"{type(e).__name__}: {first_line}"})
            print(f"lever {lever} failed: {failed[-1]['error']}", flush=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "batch": args.batch, "size": list(args.size), "dtype": str(dtype)}
    print(f"{env['device']}, torch {env['torch']}, B={args.batch}, {args.size[0]}×{args.size[1]}, {dtype}\n")
    print("| lever | variant | ms p50 | note |\n|---|---|---|---|")
    for r in rows:
        note = (f"max |Δ| {r['max_abs_diff']:.3g} of max |value| {r['max_abs_logit']:.3g}"
                if "max_abs_diff" in r else "")
        if "max_abs_grad_diff" in r:
            note += f"; gradient max |Δ| {r['max_abs_grad_diff']:.3g}"
        print(f"| {r['lever']} | {r['variant']} | {r['ms']:.3f} | {note} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows, "failed": failed}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
