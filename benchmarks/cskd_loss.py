"""Time CSKD's distillation term alone: forward + backward of the CAM / grid-PAM / CKA loss on synthetic features.

Shapes default to a 512×1024 Cityscapes crop at stride 8 with the published pair (DeepLabV3-R18 student: 128
channels, DeepLabV3-R101 teacher: 256), batch 8 per device. The teacher's features are made under
``torch.inference_mode`` as the engine does. Each variant is timed over ``--repeats`` iterations after
``--warmup`` (CUDA events on the GPU, ``perf_counter`` on the CPU); the table gives the median and the 10th/90th
percentiles, and on CUDA the peak memory the iteration allocates beyond the inputs.

``naive`` is the published algorithm's structure written plainly (new ``nn.Conv2d`` projections built at every
PAM call, a Python loop over the 25 blocks, explicit centring matrices): a yardstick on the same machine.

    python benchmarks/cskd_loss.py                                   # GPU, fp32, 8×128/256×64×128
    python benchmarks/cskd_loss.py --dtype bf16 --compile --out b.json
    python benchmarks/cskd_loss.py --device cpu --batch 4 --size 16 32   # a few seconds on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cskd.losses import build_loss
from cskd.models.segmentor import SegOutput

# name → CSKD options (λ = 0 switches a branch off)
VARIANTS: dict[str, dict] = {
    "cam": {"lambda_pam": 0.0},
    "pam/resample": {"lambda_cam": 0.0, "pam_projection": "resample"},
    "pam/fixed": {"lambda_cam": 0.0, "pam_projection": "fixed"},
    "pam/learned": {"lambda_cam": 0.0, "pam_projection": "learned"},
    "cam+pam/resample": {"pam_projection": "resample"},
    "cam+pam/fixed": {"pam_projection": "fixed"},
    "cam+pam/learned": {"pam_projection": "learned"},
}


class NaiveCSKD(nn.Module):
    """The published CSKD term's structure, for comparison only (CAM + 5×5 grid PAM, −log CKA, τ_sa = 2)."""

    def __init__(self, temperature: float = 2.0, lambda_cam: float = 0.3, lambda_pam: float = 0.8) -> None:
        super().__init__()
        self.t, self.lc, self.lp = temperature, lambda_cam, lambda_pam
        self.gamma_cam = nn.Parameter(torch.zeros(1))
        self.gamma_pam = nn.Parameter(torch.zeros(1))

    def cam(self, x: Tensor) -> Tensor:
        v = x.flatten(2)
        energy = torch.bmm(v, v.transpose(1, 2))
        energy = energy.max(dim=-1, keepdim=True).values.expand_as(energy) - energy
        return self.gamma_cam * torch.bmm(torch.softmax(energy / self.t, -1), v).view_as(x) + x

    def pam(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = (nn.Conv2d(c, o, 1).to(x.device) for o in (c // 8, c // 8, c))  # rebuilt at every call
        att = torch.softmax(torch.bmm(q(x).flatten(2).transpose(1, 2), k(x).flatten(2)) / self.t, -1)
        return self.gamma_pam * torch.bmm(v(x).flatten(2), att.transpose(1, 2)).view(b, c, h, w) + x

    @staticmethod
    def neg_log_cka(x: Tensor, y: Tensor) -> Tensor:
        x, y = x.flatten(1), y.flatten(1)
        n = x.shape[0]
        hm = torch.eye(n, device=x.device) - torch.ones(n, n, device=x.device) / n

        def hsic(a: Tensor, b: Tensor) -> Tensor:
            return ((hm @ a @ hm) * (hm @ b @ hm)).sum()

        kx, ky = x @ x.T, y @ y.T
        return -torch.log(hsic(kx, ky) / (hsic(kx, kx).sqrt() * hsic(ky, ky).sqrt()) + 1e-8)

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        fs, ft = student.features, teacher.features.clone()
        cam = self.neg_log_cka(self.cam(fs), self.cam(ft))
        bs = [blk for band in torch.chunk(fs, 5, 2) for blk in torch.chunk(band, 5, 3)]
        bt = [blk for band in torch.chunk(ft, 5, 2) for blk in torch.chunk(band, 5, 3)]
        pam = sum(self.neg_log_cka(self.pam(s), self.pam(t)) for s, t in zip(bs, bt)) / len(bs)
        return {"cam": self.lc * cam, "pam": self.lp * pam}


@dataclass
class Result:
    variant: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    peak_mib: float | None


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def time_variant(name: str, loss: nn.Module, fs: Tensor, ft: Tensor, args: argparse.Namespace) -> Result:
    device = fs.device
    cuda = device.type == "cuda"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())
    fn: Callable = torch.compile(loss, backend=args.compile_backend) if args.compile else loss
    student, teacher = SegOutput(None, None, fs), SegOutput(None, None, ft)  # type: ignore[arg-type]

    def step() -> None:
        fs.grad = None
        loss.zero_grad(set_to_none=True)
        with autocast:
            total = sum(fn(student, teacher).values())
        total.backward()

    for _ in range(args.warmup):
        step()
    times: list[float] = []
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(args.repeats)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    return Result(name, statistics.median(times), percentile(times, 0.1), percentile(times, 0.9), peak)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="samples per device (default 8)")
    p.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"),
                   help="feature-map size (default 64 128: a 512×1024 crop at stride 8)")
    p.add_argument("--student-channels", type=int, default=128)
    p.add_argument("--teacher-channels", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: features in bf16 and the loss under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="time torch.compile(loss)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--variants", nargs="+", default=[*VARIANTS, "naive"], choices=[*VARIANTS, "naive"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20, help="timed iterations (median of these; default 20)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matrix products (torch default: off)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available; pass --device cpu")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    b, (h, w) = args.batch, args.size
    # Post-ReLU maps, as the heads produce; the teacher's partly follows the student's so CKA is not trivial.
    fs = torch.randn(b, args.student_channels, h, w, device=device).relu()
    with torch.inference_mode():
        ft = torch.randn(b, args.teacher_channels, h, w, device=device).relu()
        ft[:, : args.student_channels] += 0.5 * fs
        ft = ft.to(dtype)
    fs = fs.to(dtype).requires_grad_()

    results = []
    for name in args.variants:
        if name == "naive":
            loss: nn.Module = NaiveCSKD().to(device)
        else:
            loss = build_loss("cskd", VARIANTS[name], student_channels=args.student_channels,
                              teacher_channels=args.teacher_channels, num_classes=19).to(device)
        r = time_variant(name, loss, fs, ft, args)
        results.append(r)
        print(f"  {name}: {r.median_ms:.2f} ms", file=sys.stderr, flush=True)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    compiled = f", compiled ({args.compile_backend})" if args.compile else ""
    print(f"\nCSKD loss forward+backward, B={b}, student {args.student_channels}×{h}×{w}, teacher "
          f"{args.teacher_channels}×{h}×{w}, {args.dtype}{', TF32' if args.tf32 else ''}{compiled}, {dev_name}, "
          f"torch {torch.__version__}, median of {args.repeats}\n")
    print("| variant | median ms | p10 ms | p90 ms | peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "–"
        print(f"| {r.variant} | {r.median_ms:.2f} | {r.p10_ms:.2f} | {r.p90_ms:.2f} | {peak} |")
    if args.out:
        config = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                  for k, v in vars(args).items()}
        payload = {"config": config, "device": dev_name, "torch": torch.__version__,
                   "results": [asdict(r) for r in results]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
