"""``cskd demo``: the main job on built-in synthetic data (see :mod:`cskd.studies.demo`)."""

from __future__ import annotations

import argparse
import shlex
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from ..studies.demo import PRESETS
    from ..losses.methods import METHODS

    p = sub.add_parser(
        "demo", help="distil a student on built-in synthetic street scenes and write a report",
        description="Generate synthetic street scenes (if absent), train a teacher (or reuse it), train each student "
                    "without distillation and with each method, evaluate all on the validation split, and write "
                    "<out>/report.md with the mIoU table, per-class IoU, training curves and prediction panels. "
                    "Finished runs are reused; an interrupted one resumes.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="small: a 2-core CPU in about 5 minutes (default without CUDA); paper: the published "
                        "pairs at 256×512 on a GPU (default with CUDA)")
    p.add_argument("--methods", default="baseline,cskd",
                   help=f"comma-separated methods (baseline is always included); known: {', '.join(METHODS)}")
    p.add_argument("--students", default=None,
                   help="comma-separated MODEL:BACKBONE students instead of the preset's, e.g. "
                        "deeplabv3:resnet18,segformer:mit_b0,upernet:resnet18 (models and backbones as 'cskd "
                        "models' lists them; timm:<name> backbones too)")
    p.add_argument("--teacher", default=None, metavar="MODEL:BACKBONE",
                   help="the teacher instead of the preset's, e.g. segformer:mit_b4. A model whose backbone has a "
                        "published optimiser (MobileViT, MiT: AdamW) trains with it, every other with the "
                        "preset's SGD; the report lists each one's")
    p.add_argument("--seeds", type=int, default=1, help="seeds per student and method (the table shows mean ± std)")
    p.add_argument("--teacher-iterations", type=int, default=None)
    p.add_argument("--student-iterations", type=int, default=None)
    p.add_argument("--out", default=None, help="report and run folder (default runs/demo_<preset>)")
    p.add_argument("--data-root", default=None, help="where the synthetic data lives (default data/synthscapes_HxW)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile every run (default: the preset's choice; the paper preset's short runs do "
                        "not compile)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..studies import demo

    preset = args.preset or ("paper" if args.device != "cpu" and torch.cuda.is_available() else "small")
    students = demo.parse_pairs(args.students, "--students") if args.students is not None else None
    teacher = demo.parse_pair(args.teacher, "--teacher") if args.teacher is not None else None
    plan = demo.plan(
        preset, out=args.out or f"runs/demo_{preset}", data_root=args.data_root,
        methods=tuple(m for m in args.methods.split(",") if m), seeds=args.seeds, device=args.device,
        teacher_iterations=args.teacher_iterations, student_iterations=args.student_iterations,
        students=students, teacher=teacher, compile=args.compile,
    )
    command = "cskd " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["demo"] else "cskd demo"
    demo.run(plan, progress=not args.no_progress, command=command)
    return 0
