"""The real training loop's throughput against the bare step: is the loop fed as fast as the step runs?

1. Writes ``--images`` synthetic street scenes of ``--size`` (PNG, the Cityscapes layout: ``leftImg8bit/…`` and
   ``gtFine/…_gtFine_labelIds.png`` with Cityscapes label ids; :mod:`cskd.data.synthetic`) into ``--data`` (kept
   and reused when given; a temporary folder otherwise). The config's dataset reads them as it reads the real one.
2. Runs the engine as ``cskd distill CONFIG`` does: ``load_config(CONFIG, --set …)`` and ``Trainer(cfg).fit()``,
   with ``data.root`` pointed at the scenes, ``--iterations`` iterations, one log point every ``--window``
   iterations, no checkpoint or validation before the end (one validation image at the end). Weight files the
   config names that do not exist (teacher weights, ImageNet backbones) are dropped: those models start from
   random weights, which the output says. Speed does not depend on the weights.
3. Times the same step (the Trainer's own StepRunner, on one batch kept on the device) with
   ``benchmarks/train_step.py``'s ``time_steps``, and prints the loop's img/s per window and overall, the step's,
   and their ratio. The loop's time is the Trainer's ``train_seconds`` (its first step, compilation and cuDNN
   autotuning, is left out, as the Trainer reports it).

    python benchmarks/train_loop.py --data /tmp/cs_synth --images 256 --iterations 600 --set data.workers=14
    python benchmarks/train_loop.py --device cpu --images 4 --size 64 128 --iterations 3 --window 1 \\
        --set data.crop_size=[32,64] --set train.batch_size=2 --set data.workers=0 --step-warmup 1 --step-iters 2
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cskd.data import synthetic
from cskd.engine.config import ExperimentConfig, apply_overrides, config_from_dict, expand_method, read_yaml
from cskd.engine.trainer import Trainer
from cskd.timing import cpu_name, describe_phases, dynamo_timers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import time_steps  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs/cityscapes/cskd_deeplabv3-r101_deeplabv3-r18.yaml"
WEIGHT_KEYS = ("model.pretrained_base", "model.weights", "teacher.pretrained_base", "teacher.weights")


def missing_weights(raw: dict[str, Any]) -> list[str]:
    """``--set KEY=null`` for each weight file the config names that is not on disk (relative to the working
    directory, as the engine reads it)."""
    out = []
    for key in WEIGHT_KEYS:
        block, name = key.split(".")
        path = (raw.get(block) or {}).get(name)
        if path and not Path(path).expanduser().is_file():
            print(f"{key}: {path} not found; random weights instead", flush=True)
            out.append(f"{key}=null")
    return out


def benchmark_config(path: str, overrides: list[str], device: str | None) -> tuple[ExperimentConfig, list[str]]:
    """The config at ``path`` with ``overrides`` (and ``train.device``), every weight file it names that is missing
    replaced by random weights (said on stdout); returns it with the overrides as applied."""
    overrides = [*overrides, *([f"train.device={device}"] if device else [])]
    raw = apply_overrides(expand_method(read_yaml(path), overrides), overrides)
    overrides += missing_weights(raw)
    raw = apply_overrides(raw, [o for o in overrides if o.split("=", 1)[0] in WEIGHT_KEYS])
    return config_from_dict(raw, f"{path} (benchmark settings)"), overrides


def windows(history: list[dict[str, Any]], batch: int, warmup_steps: int) -> list[dict[str, Any]]:
    """img/s between consecutive log points, from the Trainer's cumulative ``train_seconds`` (the first window
    loses the untimed first step), and the share of each window's time the loop waited for data (cumulative
    ``data_wait_seconds``)."""
    rows, last_it, last_s, last_wait = [], 0, 0.0, 0.0
    for rec in (r for r in history if r.get("kind") == "train"):
        it, sec, wait = int(rec["iteration"]), float(rec["train_seconds"]), float(rec.get("data_wait_seconds", 0.0))
        steps = it - last_it - (warmup_steps if last_it == 0 else 0)
        if sec > last_s and steps > 0:
            rows.append({"from": last_it, "to": it, "img_per_s": steps * batch / (sec - last_s),
                         "data_wait_share": (wait - last_wait) / (sec - last_s)})
        last_it, last_s, last_wait = it, sec, wait
    return rows


def compile_timers(top: int = 40) -> dict[str, float]:
    """The ``top`` largest of dynamo's timers, largest first: the whole table behind :func:`compile_phases`
    (nested timers overlap, so they do not add up)."""
    return dict(sorted(dynamo_timers().items(), key=lambda kv: -kv[1])[:top])


def compile_phases() -> dict[str, float]:
    """Seconds this process spent in torch.compile so far, by phase, from dynamo's own aggregate timers: ``total``
    = ``frames`` (each compiled frame: tracing it, its forward graph, its inference graphs) + ``backward_graphs``
    (AOTAutograd compiles a backward graph lazily, at its first backward: outside the frame's timer); then, within
    the total, dynamo's bytecode tracing, inductor (forward and backward graphs) and the wait for its parallel
    kernel builds. Empty where this torch has no such timers. What the first step spends beyond the total is
    cuDNN's autotuning and the first runs of the kernels."""
    times = dynamo_timers()
    keys = {"frames": "_compile.compile_inner", "backward_graphs": "backward._backward_impl",
            "dynamo_tracing": "bytecode_tracing", "inductor": "compile_fx_inner",
            "kernel_builds_wait": "async_compile.wait"}
    phases = {k: times[v] for k, v in keys.items() if v in times}
    if "frames" in phases:
        phases = {"total": phases["frames"] + phases.get("backward_graphs", 0.0), **phases}
    return phases


def profiled(fn: Callable[[], Any], path: str) -> Any:
    """``fn()`` under cProfile; its 60 largest functions by cumulative and by own time written to ``path``."""
    prof = cProfile.Profile()
    try:
        return prof.runcall(fn)
    finally:
        text = io.StringIO()
        for order in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=text).sort_stats(order).print_stats(60)
        Path(path).write_text(text.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="e.g. " + __doc__.split("\n\n")[-1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="as `cskd distill --set` (applied after the benchmark's own settings)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (sets train.device)")
    p.add_argument("--data", help="folder for the synthetic scenes (kept, and reused when it matches)")
    p.add_argument("--images", type=int, default=64, help="training images to generate (+1 validation image)")
    p.add_argument("--size", nargs=2, type=int, default=(1024, 2048), metavar=("H", "W"), help="source size")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--window", type=int, default=100, help="iterations per reported window")
    p.add_argument("--step-warmup", type=int, default=10)
    p.add_argument("--step-iters", type=int, default=30)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--cprofile", metavar="FILE", help="run the training under cProfile and write its 60 largest "
                   "functions by cumulative and by own time here (what a cold start-up spends its seconds on)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        t = time.perf_counter()
        synthetic.ensure(data, args.images, 1, tuple(args.size), seed=0)
        pngs = list((data / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
        # The decode cost follows the file size: compare it with the real files'.
        png_mb = sum(f.stat().st_size for f in pngs) / len(pngs) / 1e6
        print(f"{args.images} + 1 synthetic {args.size[0]}×{args.size[1]} scenes in {data} "
              f"({time.perf_counter() - t:.0f} s; image PNGs {png_mb:.2f} MB on average)", flush=True)
        overrides = [f"data.root={data}", f"output_dir={Path(tmp) / 'run'}",
                     f"train.budget={{iterations: {args.iterations}}}", f"train.log_every={args.window}",
                     "train.val_points=null", f"train.val_every={10**9}", f"train.save_every={10**9}",
                     "eval.max_images=1", *args.overrides]
        cfg, overrides = benchmark_config(args.config, overrides, args.device)

        trainer = Trainer(cfg, progress=False, overwrite=True)
        result = profiled(trainer.fit, args.cprofile) if args.cprofile else trainer.fit()
        compile_s = compile_phases()  # the first step's, and the first validation's if it compiles
        timers = compile_timers()
        batch = cfg.train.batch_size
        wins = windows(result.history, batch, trainer.warmup_steps)
        runner = trainer.runner
        step_s = statistics.median(time_steps(runner, cfg.data.crop_size, args.step_warmup, args.step_iters))
        step_ips = trainer.batch_per_device / step_s

    loop_ips = result.images_per_second
    steady = wins[1:] or wins  # the first window is fed partly by the queue the workers filled at start-up
    steady_ips = sum(w["to"] - w["from"] for w in steady) * batch / sum(
        (w["to"] - w["from"]) * batch / w["img_per_s"] for w in steady) if steady else loop_ips
    device = runner.device
    res = {
        "config": args.config, "overrides": overrides, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else cpu_name(), "torch": torch.__version__, "source": list(args.size),
        "images": args.images, "image_png_mb": png_mb, "crop": list(cfg.data.crop_size), "batch": batch,
        "workers": cfg.data.workers,
        "iterations": result.iterations, "windows": wins, "loop_img_per_s": loop_ips,
        "loop_img_per_s_after_first_window": steady_ips, "first_step_s": result.warmup_seconds,
        "startup_s": result.startup_seconds, "first_step_phases": result.first_step_phases,
        "compile_s": compile_s, "compile_timers": timers,
        "step_median_s": step_s, "step_img_per_s": step_ips, "ratio": loop_ips / step_ips,
        "ratio_after_first_window": steady_ips / step_ips,
        "data_wait_s": result.data_wait_seconds, "data_wait_share": result.data_wait_seconds / result.train_seconds
        if result.train_seconds else float("nan"),
    }
    print(f"\n{res['device']}: {cfg.name}, {args.size[0]}×{args.size[1]} PNG → {cfg.data.crop_size[0]}×"
          f"{cfg.data.crop_size[1]}, batch {batch}, {cfg.data.workers} workers, {result.iterations} iterations")
    for w in wins:
        print(f"  iterations {w['from']:>5}-{w['to']:<5} {w['img_per_s']:8.1f} img/s, "
              f"waiting for data {100 * w['data_wait_share']:5.1f} % of the time")
    print(f"loop {loop_ips:.1f} img/s overall, {steady_ips:.1f} after the first window; step benchmark "
          f"{step_ips:.1f} img/s ({1000 * step_s:.1f} ms/step); loop/step {100 * res['ratio']:.1f} % "
          f"({100 * res['ratio_after_first_window']:.1f} % after the first window); the loop waited for data "
          f"{res['data_wait_s']:.1f} s ({100 * res['data_wait_share']:.1f} % of its training time)")
    if compile_s:
        print(f"first step {result.warmup_seconds:.1f} s; torch.compile {compile_s.get('total', 0.0):.1f} s in all "
              f"(frames {compile_s.get('frames', 0.0):.1f} s, their backward graphs "
              f"{compile_s.get('backward_graphs', 0.0):.1f} s; of the total: dynamo tracing "
              f"{compile_s.get('dynamo_tracing', 0.0):.1f} s, inductor {compile_s.get('inductor', 0.0):.1f} s, "
              f"waiting for kernel builds {compile_s.get('kernel_builds_wait', 0.0):.1f} s)")
    if result.first_step_phases:
        print(f"first step by phase: {describe_phases(result.first_step_phases)}")
    if timers:
        print("torch.compile's largest timers (nested ones overlap): " + ", ".join(
            f"{name} {sec:.1f} s" for name, sec in list(timers.items())[:12]))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
