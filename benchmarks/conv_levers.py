"""Per-shape timings of two convolution levers for the distillation step, at the shapes the step really runs.

For a teacher → student pair at the training size, hooks record every convolution's shape; each distinct shape
is then timed on its own (CUDA events, median) two ways:

- dilated 3×3 convolutions: the library's dilated kernel against the same convolution on a space-to-batch
  rearrangement (``cskd.models.atrous``): the dense kernel alone on pre-arranged phases (what a fusing compiler
  can reach) and with the rearranging copies (eager). Teacher: forward only; student: forward + backward.
- the teacher's 1×1 convolutions (GEMMs): bf16 against FP8 ``torch._scaled_mm`` (e4m3, per-tensor scales), the
  GEMM alone and with the activation's cast to FP8.

Each row is multiplied by how often the shape occurs in one step, so the table ends with the milliseconds per
step each lever could save. Prints a Markdown table; ``--out`` writes JSON.

    python benchmarks/conv_levers.py --out conv_levers.json                # H200: B = 8, 512×1024, R101 → R18
    python benchmarks/conv_levers.py --device cpu --batch 1 --size 64 128 --iters 2 --warmup 1   # CI-sized
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cskd.models import atrous, fp8
from cskd.models.atrous import space_to_batch_conv2d
from cskd.models.fp8 import FP8_MAX
from cskd.models.segmentor import build_segmentor
from cskd.timing import cpu_name, time_calls


class ConvShape(NamedTuple):
    cin: int
    cout: int
    k: int
    stride: int
    dilation: int
    groups: int
    h: int
    w: int


def lever_kind(conv: nn.Conv2d) -> str | None:
    """Which lever applies to ``conv``: "dilated" (space-to-batch), "1x1" (FP8, for the teacher) or None."""
    if atrous.eligible(conv):
        return "dilated"
    return "1x1" if fp8.eligible(conv) else None


def conv_shapes(model: nn.Module, batch: int, size: tuple[int, int]) -> Counter[tuple[ConvShape, str | None]]:
    """(shape, :func:`lever_kind`) → how many times one forward at ``size`` runs it."""
    seen: Counter[tuple[ConvShape, str | None]] = Counter()

    def hook(mod: nn.Conv2d, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        shape = ConvShape(mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.dilation[0],
                          mod.groups, x.shape[-2], x.shape[-1])
        seen[(shape, lever_kind(mod))] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, *size))  # shapes do not depend on the batch
    for h in handles:
        h.remove()
    return seen


def _timed(fn: Callable[[], Any], args: argparse.Namespace, cuda: bool) -> float:
    ms, _ = time_calls(fn, warmup=args.warmup, iters=args.iters, cuda=cuda)
    return statistics.median(ms)


def time_dilated(s: ConvShape, batch: int, backward: bool, args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype) -> dict[str, float]:
    cuda = device.type == "cuda"
    x = torch.randn(batch, s.cin, s.h, s.w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(s.cout, s.cin // s.groups, s.k, s.k, device=device, dtype=dtype) * 0.05).contiguous(
        memory_format=torch.channels_last)
    d, pad = s.dilation, s.dilation * (s.k - 1) // 2
    x.requires_grad_(backward)
    w.requires_grad_(backward)
    hp, wp = -(-s.h // d) * d, -(-s.w // d) * d
    phases = torch.randn(batch * d * d, s.cin, hp // d, wp // d, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_(backward)

    def run(f: Callable[[], Tensor]) -> Callable[[], None]:
        def call() -> None:
            y = f()
            if backward:
                y.backward(torch.ones_like(y))
        return call

    with torch.set_grad_enabled(backward):
        return {
            "dilated_ms": _timed(run(lambda: F.conv2d(x, w, padding=pad, dilation=d, groups=s.groups)), args, cuda),
            "dense_on_phases_ms": _timed(run(lambda: F.conv2d(phases, w, padding=(s.k - 1) // 2, groups=s.groups)),
                                         args, cuda),
            "space_to_batch_ms": _timed(run(lambda: space_to_batch_conv2d(x, w, None, d, s.groups)), args, cuda),
        }


def time_1x1(s: ConvShape, batch: int, args: argparse.Namespace, device: torch.device,
             dtype: torch.dtype) -> dict[str, float] | None:
    """Forward only (the frozen teacher): bf16 conv vs FP8 GEMM (None where _scaled_mm cannot run this shape)."""
    cuda = device.type == "cuda"
    x = torch.randn(batch, s.cin, s.h, s.w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(s.cout, s.cin, 1, 1, device=device, dtype=dtype) * 0.05).contiguous(
        memory_format=torch.channels_last)
    rows = x.permute(0, 2, 3, 1).reshape(-1, s.cin)  # a view of the channels_last input
    scale = torch.tensor(1.0, device=device)
    wq = w.view(s.cout, s.cin).to(torch.float8_e4m3fn)  # [Cout, Cin] row-major: its .t() is column-major
    xq = rows.to(torch.float8_e4m3fn)

    def fp8_cast_and_gemm() -> Tensor:
        q = (rows * (1 / scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return torch._scaled_mm(q, wq.t(), scale_a=scale, scale_b=scale, out_dtype=dtype)

    try:
        torch._scaled_mm(xq, wq.t(), scale_a=scale, scale_b=scale, out_dtype=dtype)
    except (RuntimeError, NotImplementedError):
        return None
    with torch.no_grad():
        return {
            "bf16_conv_ms": _timed(lambda: F.conv2d(x, w), args, cuda),
            "fp8_gemm_ms": _timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=scale, scale_b=scale,
                                                            out_dtype=dtype), args, cuda),
            "fp8_cast_and_gemm_ms": _timed(fp8_cast_and_gemm, args, cuda),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", nargs=2, default=("deeplabv3", "resnet101"), metavar=("MODEL", "BACKBONE"))
    p.add_argument("--student", nargs=2, default=("deeplabv3", "resnet18"), metavar=("MODEL", "BACKBONE"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine trains
    size = tuple(args.size)
    rows: list[dict[str, Any]] = []
    for role, (model, backbone) in (("teacher", args.teacher), ("student", args.student)):
        net = build_segmentor(model, backbone, num_classes=19)
        shapes = conv_shapes(net, args.batch, size)
        for (s, kind), count in sorted(shapes.items(), key=lambda item: (item[0][0], str(item[0][1]))):
            row: dict[str, Any] = {"role": role, **s._asdict(), "count": count}
            if kind == "dilated":
                row.update(kind=kind, **time_dilated(s, args.batch, role == "student", args, device, dtype))
            elif kind == "1x1" and role == "teacher":  # FP8 is for the frozen teacher only
                timed = time_1x1(s, args.batch, args, device, dtype)
                if timed is None:
                    continue
                row.update(kind=kind, **timed)
            else:
                continue
            rows.append(row)
            print(f"{role} {row['kind']} {s}: ×{count} " + ", ".join(
                f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms")), flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"\n{name}, torch {torch.__version__}, B={args.batch}, {size[0]}×{size[1]}, bf16, channels_last; "
          "ms per call (median); Σ = × count per step\n")
    print("| role | kind | Cin→Cout | k, d | map | count | library ms | lever ms (kernel alone) | lever ms (with copies/cast) |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals: dict[str, float] = {}
    for r in rows:
        base, alone, full = ((r["dilated_ms"], r["dense_on_phases_ms"], r["space_to_batch_ms"]) if r["kind"] == "dilated"
                             else (r["bf16_conv_ms"], r["fp8_gemm_ms"], r["fp8_cast_and_gemm_ms"]))
        print(f"| {r['role']} | {r['kind']} | {r['cin']}→{r['cout']} | {r['k']}, {r['dilation']} | {r['h']}×{r['w']} "
              f"| {r['count']} | {base:.3f} | {alone:.3f} | {full:.3f} |")
        key = f"{r['role']} {r['kind']}"
        for suffix, v in (("library", base), ("alone", alone), ("full", full)):
            totals[f"{key} {suffix}"] = totals.get(f"{key} {suffix}", 0.0) + v * r["count"]
    print("\nΣ ms per step (library → lever alone / with copies):")
    for key in dict.fromkeys(k.rsplit(" ", 1)[0] for k in totals):
        print(f"- {key}: {totals[key + ' library']:.2f} → {totals[key + ' alone']:.2f} / {totals[key + ' full']:.2f}")
    if args.out:
        meta = {"device": name, "torch": torch.__version__, "batch": args.batch, "size": list(size),
                "teacher": list(args.teacher), "student": list(args.student), "warmup": args.warmup,
                "iters": args.iters}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "totals_ms": totals}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
