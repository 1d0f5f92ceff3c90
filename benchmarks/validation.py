"""Validation throughput end to end, as the Trainer validates: PNG decode in the loader's workers, the copy to the
device, inference, the resize of the logits to the label's size, argmax and the confusion matrix.

Generates synthetic scenes in the Cityscapes layout (1024×2048 by default), builds the engine's Trainer from a
config (random weights where the config's files are missing), and calls its ``evaluate`` ``--rounds`` times: the
first round includes the workers' start-up and the first forward at the full size (cuDNN autotuning), the next
ones run on the persistent workers, as every later validation of a run does. Reports, per round, the seconds, the
first batch's seconds and img/s after the first batch (the Trainer's own timing).

    python benchmarks/validation.py --data /tmp/cs_val --images 64 --set data.workers=14 --out val_h200.json
    python benchmarks/validation.py --device cpu --images 4 --size 64 128 --rounds 2 --set data.workers=0   # CI-sized

``--profile`` runs the last round under torch.profiler and prints its top kernels and, per image, the wall time
against the GPU's kernel time: which side, the device or the host and loader, is short.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cskd.data import synthetic
from cskd.engine.trainer import Trainer
from cskd.timing import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_loop import benchmark_config  # noqa: E402
from train_step import kernel_time_us  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs/cityscapes/baseline_deeplabv3-r18.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="e.g. " + __doc__.split("\n\n")[-1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the model and eval settings come from here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="as `cskd train --set` (applied after the benchmark's own settings)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (sets train.device)")
    p.add_argument("--data", help="folder for the synthetic scenes (kept, and reused when it matches)")
    p.add_argument("--images", type=int, default=64, help="validation images to generate")
    p.add_argument("--size", nargs=2, type=int, default=(1024, 2048), metavar=("H", "W"))
    p.add_argument("--rounds", type=int, default=3, help="validations in a row (the first starts the workers)")
    p.add_argument("--profile", action="store_true", help="run the last round under torch.profiler (top kernels)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        t = time.perf_counter()
        synthetic.ensure(data, 1, args.images, tuple(args.size), seed=0)
        print(f"{args.images} synthetic {args.size[0]}×{args.size[1]} validation scenes in {data} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        overrides = [f"data.root={data}", f"output_dir={Path(tmp) / 'run'}", "eval.max_images=null",
                     "train.budget={iterations: 1}", *args.overrides]
        cfg, overrides = benchmark_config(args.config, overrides, args.device)

        trainer = Trainer(cfg, progress=False, overwrite=True)
        rounds: list[dict[str, Any]] = []
        try:
            for i in range(args.rounds):
                if args.profile and i == args.rounds - 1:
                    profiled = profile_round(trainer)
                else:
                    trainer.evaluate()
                timing = dict(trainer.last_val_timing)
                rounds.append(timing)
                print(f"round {i + 1}: {timing['seconds']:.2f} s for {timing['images']:.0f} images; first batch "
                      f"{timing['first_batch_seconds']:.2f} s; {timing['images_per_second']:.1f} img/s after it, "
                      f"{timing['loader_wait_seconds']:.2f} s of it waiting for the loader", flush=True)
        finally:
            trainer.close()
        device = trainer.device

    res = {
        "config": args.config, "overrides": overrides, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "model": f"{cfg.model.model}-{cfg.model.backbone}", "size": list(args.size), "images": args.images,
        "workers": cfg.data.workers, "eval_batch": cfg.eval.batch_size, "eval_mode": cfg.eval.mode,
        "cache": cfg.data.cache, "rounds": rounds,
    }
    if args.profile:
        res["profile"] = profiled
    print(f"\n{res['device']}: {res['model']}, {args.images} images at {args.size[0]}×{args.size[1]}, "
          f"{cfg.data.workers} workers, eval batch {cfg.eval.batch_size}, mode {cfg.eval.mode}"
          + (f", cache {cfg.data.cache}" if cfg.data.cache else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


def profile_round(trainer: Trainer) -> dict[str, float]:
    """One validation under torch.profiler: prints the top kernels, returns the wall and kernel ms per image."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        trainer.evaluate()
    averages = prof.key_averages()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(averages.table(sort_by=key, row_limit=20, max_name_column_width=70))
    images = trainer.last_val_timing["images"]
    out = {"wall_ms_per_image": 1000 * trainer.last_val_timing["seconds"] / images}
    if cuda:
        out["kernel_ms_per_image"] = kernel_time_us(averages) / 1000 / images
    print("profiled round, per image: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
