"""Time CIRKD's and CIRKDV2's distillation terms alone: forward + backward on synthetic features and labels.

Shapes default to a small CPU case (B = 2, 19 classes, 64×128 feature maps, the published channel pair: DeepLabV3-R18
student 128, DeepLabV3-R101 teacher 256) and the published queue sizes. Each loss is timed over ``--iters`` calls
after ``--warmup`` (CUDA events on the GPU, ``perf_counter`` on the CPU, where the process's CPU time per call is
also given: steadier than the wall clock on a shared machine); ``--profile`` also prints the operator count of one
call, the number of host synchronisations (``aten::_local_scalar_dense``) and the operators taking the most time.

    python benchmarks/cirkd_loss.py --device cpu                      # B=2, 19 classes, 64×128
    python benchmarks/cirkd_loss.py --device cuda --batch 8 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch import Tensor

from cskd.losses import build_loss
from cskd.models.segmentor import SegOutput
from cskd.timing import time_calls


def make_inputs(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    h, w = args.size
    fs = torch.randn(args.batch, args.cs, h, w, generator=g).to(device)
    ft = torch.randn(args.batch, args.ct, h, w, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch, h, w), generator=g)
    labels[:, : h // 8] = 255  # some ignored pixels
    targets = labels.repeat_interleave(8, 1).repeat_interleave(8, 2).to(device)  # the image size (stride 8)
    return fs, ft, targets


def make_call(name: str, args: argparse.Namespace, device: torch.device):  # noqa: ANN201
    loss = build_loss(name, student_channels=args.cs, teacher_channels=args.ct, num_classes=args.classes)
    loss = loss.to(device).train()
    fs, ft, targets = make_inputs(args, device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    if dtype is not None:
        fs, ft = fs.to(dtype), ft.to(dtype)
    fs.requires_grad_(True)
    logits = torch.zeros(args.batch, args.classes, *args.size, device=device)

    def call() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = loss(SegOutput(logits, None, fs), SegOutput(logits, None, ft), targets)
        sum(out.values()).backward()

    return call


def op_counts(call) -> tuple[Counter, str]:  # noqa: ANN001
    """Calls per operator of one ``call``, and the profiler's table of the operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        call()
    averages = prof.key_averages()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = averages.table(sort_by=key, row_limit=12, max_name_column_width=40)
    return Counter({e.key: e.count for e in averages}), table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="cirkd,cirkdv2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"), help="feature map size")
    p.add_argument("--cs", type=int, default=128)
    p.add_argument("--ct", type=int, default=256)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    for name in args.methods.split(","):
        torch.manual_seed(0)
        call = make_call(name, args, device)
        cpu0 = time.process_time()
        ms, _ = time_calls(call, warmup=args.warmup, iters=args.iters, cuda=device.type == "cuda")
        cpu = (time.process_time() - cpu0) / (max(1, args.warmup) + args.iters) * 1000
        print(f"{name}: forward+backward {statistics.median(ms):.1f} ms (median of {args.iters}; "
              f"min {min(ms):.1f}; process CPU time {cpu:.0f} ms per call)", flush=True)
        if args.profile:
            counts, table = op_counts(call)
            total = sum(v for k, v in counts.items() if k.startswith("aten::"))
            syncs = counts["aten::_local_scalar_dense"]
            print(f"  aten ops per call: {total}; host syncs (_local_scalar_dense): {syncs}")
            top = sorted(((v, k) for k, v in counts.items() if k.startswith("aten::")), reverse=True)[:12]
            print("  " + ", ".join(f"{k.removeprefix('aten::')} {v}" for v, k in top))
            print(table)


if __name__ == "__main__":
    main()
