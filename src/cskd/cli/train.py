"""``cskd train`` (a teacher or a student alone) and ``cskd distill`` (a student from a teacher)."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.01 --set data.root=/data/cityscapes "
                        "(repeatable; values are YAML)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue a run: 'auto' (default when the flag is given) takes <output-dir>/last.pt if "
                        "present, or give a checkpoint path")
    p.add_argument("--output-dir", help="where checkpoints and logs go (default: runs/<name>)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="start again in an output dir that holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model alone (a teacher, or a student baseline)",
        description="Train the config's 'model' with cross-entropy (+ aux) only. Multi-GPU: "
                    "torchrun --nproc_per_node=N -m cskd train CONFIG.",
    )
    _common(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser(
        "distill", help="distil a student from a teacher with the config's losses",
        description="Train the config's 'model' (the student) with cross-entropy (+ aux) and the distillation terms "
                    "listed under 'losses', from the frozen 'teacher'. Multi-GPU: "
                    "torchrun --nproc_per_node=N -m cskd distill CONFIG.",
    )
    _common(p)
    p.add_argument("--teacher-weights", help="teacher checkpoint (cskd or published layout); sets teacher.weights")
    p.add_argument("--student-pretrained-base",
                   help="ImageNet backbone file for the student; sets model.pretrained_base")
    p.set_defaults(func=run_distill)


def _load(args: argparse.Namespace, extra: list[str]):  # noqa: ANN202
    from ..engine.config import load_config

    overrides = list(args.overrides) + extra
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    return load_config(args.config, overrides)


def _run(cfg, args: argparse.Namespace) -> int:  # noqa: ANN001
    from ..distributed import cleanup
    from ..engine.trainer import train

    try:
        train(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"cskd {args.command}: interrupted; {interrupted_note(cfg)}", file=sys.stderr, flush=True)
        return 130
    finally:
        cleanup()
    return 0


def interrupted_note(cfg) -> str:  # noqa: ANN001
    """What remains after Ctrl-C (a save in progress leaves the previous file: the writes are atomic) and the
    command that continues the run."""
    from ..engine.trainer import resume_hint

    last = cfg.run_dir / "last.pt"
    kept = f"the last checkpoint {last} is intact. " if last.is_file() else ""
    return kept + resume_hint(cfg)


def run_train(args: argparse.Namespace) -> int:
    cfg = _load(args, [])
    if cfg.losses:
        raise ConfigError(
            f"{args.config} lists distillation losses: run it with `cskd distill`, or train the student alone with "
            "--set losses=[]"
        )
    return _run(cfg, args)


def run_distill(args: argparse.Namespace) -> int:
    extra = []
    if args.teacher_weights:
        extra.append(f"teacher.weights={args.teacher_weights}")
    if args.student_pretrained_base:
        extra.append(f"model.pretrained_base={args.student_pretrained_base}")
    cfg = _load(args, extra)
    if not cfg.losses:
        raise ConfigError(f"{args.config} lists no distillation losses: use `cskd train` for a model alone")
    return _run(cfg, args)
