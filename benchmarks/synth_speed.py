"""Generation speed of the synthetic street scenes (``cskd data synth``): images/s including PNG writing.

Runs the real ``cskd.data.synthetic.generate`` into a temporary folder with ``--workers`` processes, then times
one process's share (render vs PNG encoding) on a few images to show where the time goes.

Wall-clock images/s depends on what else the machine runs; the CPU seconds the worker processes used give a
second figure that does not: ``images / (worker CPU seconds / workers)`` is the rate on otherwise idle cores.

    python benchmarks/synth_speed.py                       # 200 images at 256×512, 2 workers
    python benchmarks/synth_speed.py --n 40 --out s.json   # quicker
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from cskd.data import synthetic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="images to generate (all in the train split)")
    p.add_argument("--size", nargs=2, type=int, default=(256, 512), metavar=("H", "W"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--breakdown", type=int, default=20, help="images timed one by one for the breakdown")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    size = tuple(args.size)

    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        synthetic.generate(tmp, args.n, 0, size, seed=0, workers=args.workers)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's workers, joined by generate
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    render_ms, png_ms = [], []
    for i in range(args.breakdown):
        t0 = time.perf_counter()
        img, lab = synthetic.render_sample(1, "train", i, size)
        t1 = time.perf_counter()
        Image.fromarray(img).save(io.BytesIO(), format="PNG", compress_level=1)
        Image.fromarray(lab).save(io.BytesIO(), format="PNG", compress_level=6)
        t2 = time.perf_counter()
        render_ms.append(1e3 * (t1 - t0))
        png_ms.append(1e3 * (t2 - t1))

    res = {
        "size": list(size), "images": args.n, "workers": args.workers, "cpus": os.cpu_count(),
        "seconds": round(wall, 2), "images_per_s": round(args.n / wall, 1),
        "worker_cpu_s": round(cpu, 2),
        "images_per_s_idle_cores": round(args.n / (cpu / args.workers), 1) if args.workers > 1 and cpu else None,
        "per_image_one_process_ms": {"render": round(statistics.median(render_ms), 1),
                                     "png_encode": round(statistics.median(png_ms), 1)},
        "python": platform.python_version(), "numpy": np.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    h, w = size
    print(f"synthscapes generation, {h}×{w}, {args.n} images, {args.workers} workers on {os.cpu_count()} CPUs: "
          f"{res['images_per_s']} images/s ({wall:.1f} s, PNG writing included)")
    if res["images_per_s_idle_cores"]:
        print(f"worker CPU time {cpu:.1f} s → {res['images_per_s_idle_cores']} images/s on {args.workers} idle cores")
    print(f"one process, median per image: render {res['per_image_one_process_ms']['render']} ms, "
          f"PNG encode {res['per_image_one_process_ms']['png_encode']} ms")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
