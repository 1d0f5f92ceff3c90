"""``cskd compare``: methods side by side at equal iterations and at equal training time (see :mod:`cskd.studies.compare`)."""

from __future__ import annotations

import argparse
import shlex
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from ..losses.methods import METHODS

    p = sub.add_parser(
        "compare", help="compare distillation methods at equal iterations and at equal GPU time",
        description="Run every method on CONFIG's data, teacher and student with the same seeds, under an iteration "
                    "budget and/or a training-time budget, and write tables (Markdown/CSV/JSON) and mIoU curves "
                    "against time and iterations. Re-running the command skips finished runs and resumes an "
                    "interrupted one; a failing method is reported, not fatal.",
    )
    p.add_argument("config", help="experiment YAML giving data, student, teacher (with weights) and schedule")
    p.add_argument("--methods", default="baseline,kd,cwd,cskd",
                   help=f"comma-separated method names; known: {', '.join(METHODS)}")
    p.add_argument("--budget", default="iterations,time",
                   help="iterations, time, or both (comma-separated; default both)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--gpu-seconds", type=float, default=None,
                   help="training seconds per run for the time budget (default: the mean training time of the "
                        "--time-reference method in the iteration budget)")
    p.add_argument("--time-reference", default="kd", help="the method whose iteration-budget time sets the time budget")
    p.add_argument("--val-points", type=int, default=8, help="evaluations per run, evenly spread (the curves' points)")
    p.add_argument("--out", default=None, help="report folder (default runs/compare_<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..studies import compare

    plan = compare.plan(
        args.config, tuple(m for m in args.methods.split(",") if m), seeds=args.seeds,
        budgets=tuple(b for b in args.budget.split(",") if b), out=args.out, gpu_seconds=args.gpu_seconds,
        time_reference=args.time_reference, val_points=args.val_points, overrides=tuple(args.overrides),
    )
    command = "cskd " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else \
        "cskd compare"
    compare.run(plan, progress=not args.no_progress, command=command)
    return 0
