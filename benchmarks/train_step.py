"""Time the engine's full training step for each method (every registered method, or the student / teacher alone).

Builds cskd's teacher and student through the engine's own StepRunner (the object the Trainer uses), feeds random
uint8 batches of the training size, and times each step with CUDA events after warm-up (host clock + synchronize
on the CPU). Prints a Markdown table and writes JSON.

    python benchmarks/train_step.py                       # H100: B=8, 512×1024, bf16, R101 → R18
    python benchmarks/train_step.py --compile --out step.json
    python benchmarks/train_step.py --methods cwd,cskd,dist,afdcd --student segformer mit_b0
    python benchmarks/train_step.py --device cpu --batch 3 --size 64 128 --iters 3 --warmup 1   # CI-sized
    python benchmarks/train_step.py --compile --no-flops --methods teacher,cwd,cskd \
        --set train.teacher_precision=fp8 --out fp8.json   # any config key, applied last (repeatable)

With ``train.teacher_precision=fp8`` the teacher is calibrated on the benchmark's random batch (its scales then fit
uniform noise rather than images: the timing does not depend on them). The FLOP counter does not count
``_scaled_mm``, so an FP8 teacher's 1×1 convolutions are missing from GFLOP/img.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cskd.distributed import DistEnv
from cskd.engine.config import apply_overrides, config_from_dict
from cskd.losses.methods import get_method
from cskd.engine.runner import StepRunner
from cskd.timing import cpu_name, describe_phases, time_calls

# Rows beside the registered methods: the student alone, and the teacher's forward + the student alone.
EXTRA_ROWS: dict[str, tuple[bool, list[dict[str, Any]]]] = {"student": (False, []), "teacher": (True, [])}


def method_row(method: str) -> tuple[bool, list[dict[str, Any]]]:
    """(teacher forward?, distillation losses) of a benchmark row: a registered method (``cskd.losses.methods``)
    or one of ``EXTRA_ROWS``."""
    if method in EXTRA_ROWS:
        return EXTRA_ROWS[method]
    try:
        m = get_method(method)
    except KeyError as e:
        raise SystemExit(f"--methods: {e.args[0]}; or one of {', '.join(EXTRA_ROWS)}") from None
    return m.is_distillation, [dict(lc) for lc in m.losses]


def make_runner(args: argparse.Namespace, method: str, device: torch.device, eager: bool = False) -> StepRunner:
    with_teacher, losses = method_row(method)
    amp = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}[args.dtype]
    raw = {
        "name": f"bench_{method}",
        "model": {"model": args.student[0], "backbone": args.student[1]},
        "teacher": {"model": args.teacher[0], "backbone": args.teacher[1]},
        "losses": losses,
        "data": {"crop_size": list(args.size)},
        "train": {"batch_size": args.batch, "amp": amp, "compile": args.compile and not eager,
                  "compile_mode": args.compile_mode, "loss_compile_mode": args.loss_compile_mode, "channels_last": not args.no_channels_last,
                  "device": str(device), "budget": {"iterations": 10**6}},
    }
    cfg = config_from_dict(apply_overrides(raw, args.set), "benchmark config" + (" (with --set)" if args.set else ""))
    if device.type == "cuda":  # the engine's setting (Trainer._configure_backends), from the config
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    runner = StepRunner(cfg, args.num_classes, DistEnv(0, 1, 0, device), args.batch, with_teacher=with_teacher)
    if runner.fp8_pending:  # train.teacher_precision=fp8: calibrate (and then compile) the teacher first
        runner.quantize_teacher(runner.random_batch(tuple(args.size))["image"])
    return runner


def count_step_flops(runner: StepRunner, size: tuple[int, int]) -> float:
    """FLOPs of one step per image: teacher forward + student forward and backward + loss terms, as
    torch.utils.flop_counter counts them over one step of the runner's batch."""
    batch = runner.random_batch(size)
    with FlopCounterMode(display=False) as counter:
        runner.step(*runner.prepare(batch))
    return counter.get_total_flops() / runner.batch_per_device


@contextmanager
def gc_pauses() -> Iterator[list[float]]:
    """Seconds of each garbage collection while the block runs: a host pause that a step's p90 would show."""
    pauses: list[float] = []
    start = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - start[0])

    gc.callbacks.append(callback)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(callback)


def time_steps(runner: StepRunner, size: tuple[int, int], warmup: int, iters: int,
               pauses: list[float] | None = None) -> list[float]:
    """Seconds of each timed step (CUDA events on a GPU), after ``warmup`` untimed steps. ``pauses``, a list,
    receives the seconds of each garbage collection during the timed steps (and the last warm-up step), not
    during compilation."""
    x, masks = runner.prepare(runner.random_batch(size))
    ahead = x if runner.pipelines_teacher else None  # teacher_stream=pipeline: the "next" batch is this one again
    for _ in range(warmup - 1):
        runner.step(x, masks, ahead)
    with gc_pauses() as seen:
        ms, _ = time_calls(lambda: runner.step(x, masks, ahead), warmup=1, iters=iters,
                           cuda=runner.device.type == "cuda")
    if pauses is not None:
        pauses.extend(seen)
    return [t / 1000 for t in ms]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="student,teacher,cwd,cskd,cskd_fixed,kd")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--compile", action="store_true")
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    p.add_argument("--compile-mode", default="default", choices=modes)
    p.add_argument("--loss-compile-mode", default=None, choices=modes, help="for the losses (default: --compile-mode)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--teacher", nargs=2, default=("deeplabv3", "resnet101"), metavar=("MODEL", "BACKBONE"))
    p.add_argument("--student", nargs=2, default=("deeplabv3", "resnet18"), metavar=("MODEL", "BACKBONE"))
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (it runs one extra eager step)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the benchmark's config (e.g. train.teacher_precision=fp8); repeatable")
    p.add_argument("--profile", metavar="METHOD",
                   help="after timing, profile 5 steps of METHOD with torch.profiler and print the top kernels "
                        "(and write a Chrome trace beside --out)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    size = tuple(args.size)
    rows = []
    for method in args.methods.split(","):
        torch.manual_seed(0)
        # Counted on an eager twin: a FlopCounterMode around compiled code would leave it running eagerly.
        flops = None if args.no_flops else count_step_flops(make_runner(args, method, device, eager=True), size)
        runner = make_runner(args, method, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        pauses: list[float] = []
        times = time_steps(runner, size, args.warmup, args.iters, pauses)
        med = statistics.median(times)
        row = {
            "method": method, "median_s": med, "p10_s": sorted(times)[len(times) // 10],
            "p90_s": sorted(times)[(9 * len(times)) // 10], "img_per_s": args.batch / med,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "gflop_per_img": flops / 1e9 if flops else None,
            "tflops": flops * args.batch / med / 1e12 if flops else None,
            # every timed step in order (where a slow p90 comes from), and the garbage collections meanwhile
            "step_s": times, "gc_collections": len(pauses), "gc_seconds": sum(pauses),
            "dilated_convs": runner.cfg.train.resolved_dilated_convs(device),  # what "auto" chose here
            # this runner's first step by phase: its compile (what earlier methods compiled comes from the caches)
            "first_step": runner.first_step_phases,
        }
        rows.append(row)
        print(f"{method}: {med * 1000:.1f} ms/step, {row['img_per_s']:.1f} img/s; first step: "
              f"{describe_phases(runner.first_step_phases or {})}", flush=True)
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ref = {r["method"]: r["median_s"] for r in rows}
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "batch": args.batch, "size": list(size), "dtype": args.dtype,
        "compile": args.compile, "compile_mode": args.compile_mode, "loss_compile_mode": args.loss_compile_mode,
        "channels_last": not args.no_channels_last, "teacher": list(args.teacher),
        "student": list(args.student), "warmup": args.warmup, "iters": args.iters, "set": list(args.set),
    }
    mode = f" ({args.compile_mode}; losses {args.loss_compile_mode or args.compile_mode})" if args.compile else ""
    print(f"\n{meta['device']}, torch {meta['torch']}, B={args.batch}, {size[0]}×{size[1]}, {args.dtype}, "
          f"compile={'on' if args.compile else 'off'}{mode}, {args.teacher[0]}-{args.teacher[1]} → "
          f"{args.student[0]}-{args.student[1]}\n")
    print("| method | ms/step p50 [p90] | img/s | vs teacher-only step | vs CWD step | peak GiB | GFLOP/img | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{100 * (r['median_s'] / ref['teacher'] - 1):+.1f}%" if "teacher" in ref else "–"
        vs_cwd = f"{100 * (r['median_s'] / ref['cwd'] - 1):+.1f}%" if "cwd" in ref else "–"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "–"
        gf = f"{r['gflop_per_img']:.0f}" if r["gflop_per_img"] else "–"
        tf = f"{r['tflops']:.3g}" if r["tflops"] else "–"
        print(f"| {r['method']} | {1000 * r['median_s']:.1f} [{1000 * r['p90_s']:.1f}] | {r['img_per_s']:.1f} | {rel} "
              f"| {vs_cwd} | {peak} | {gf} | {tf} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    if args.profile:
        profile(args, device, size)


def kernel_time_us(averages: Iterable[Any]) -> float:
    """The GPU's kernel time in profiler averages, as the profiler's table totals it: device events only, without
    user annotations (compiled graphs appear as annotated GPU ranges around their kernels; counting them, as
    ``total_average()`` does, gave 3× the kernel time)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in averages
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation)


def profile(args: argparse.Namespace, device: torch.device, size: tuple[int, int]) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.manual_seed(0)
    runner = make_runner(args, args.profile, device)
    x, masks = runner.prepare(runner.random_batch(size))
    ahead = x if runner.pipelines_teacher else None
    for _ in range(args.warmup):
        runner.step(x, masks, ahead)
    runner.sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts, record_shapes=True) as prof:  # shapes: which convolution a kernel serves
        for _ in range(5):
            runner.step(x, masks, ahead)
        runner.sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of 5 '{args.profile}' steps, by self {key.split('_')[1]} time:")
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
    print("\nthe same, by operator and input shapes:")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=25, max_name_column_width=40,
                                                             max_shapes_column_width=90))
    total = prof.key_averages().total_average()
    host_ms = total.self_cpu_time_total / 5 / 1000
    line = f"per step: host {host_ms:.1f} ms of self CPU time (profiler overhead included)"
    if device.type == "cuda":
        line += f", GPU {kernel_time_us(prof.key_averages()) / 5 / 1000:.1f} ms of kernels"
    print(line)
    if args.out:
        prof.export_chrome_trace(args.out.rsplit(".", 1)[0] + f"_{args.profile}_trace.json")


if __name__ == "__main__":
    main()
