"""The main job on built-in data: generate synthetic street scenes, train a teacher, train students without and
with distillation, evaluate them all, and write a report with numbers and pictures.

Everything runs through the same engine as real experiments; the demo only chooses sizes and iteration counts
(a *preset*) and collects the runs into one report. Re-running the same command reuses finished runs (the teacher
included) and resumes an interrupted one.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..engine.config import ExperimentConfig, config_from_dict
from ..engine.records import dumps
from ..errors import ConfigError
from ..losses.methods import METHODS
from ..timing import environment
from .runs import (
    RunRecord, fmt_pct, group_records, markdown_table, mean_std, plot_curves, run_one,
)

Pair = tuple[str, str]
"""(model, backbone): a registered head and a registered backbone (or ``timm:<name>``)."""


def pair_name(pair: Pair) -> str:
    """The pair's name in reports and run folders, from the registries: ``DeepLabV3-R18``, ``SegFormer-MiT-B0``,
    ``UperNet-R18``, ``DeepLabV3-MobileViT-XXS`` (:func:`cskd.models.segmentor.display_name`)."""
    from ..models.segmentor import display_name

    return display_name(*pair)


def folder_name(pair: Pair) -> str:
    """:func:`pair_name` with what a file name should not hold (``:`` of ``timm:<name>``, ``/``) as ``_``; the same
    as the name for every registered pair, so report folders keep their names."""
    return _safe(pair_name(pair))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def parse_pair(text: str, option: str = "--students") -> Pair:
    """``MODEL:BACKBONE`` → (registered head name, backbone), checked against the registries; a ConfigError of one
    line naming ``option`` and the value otherwise. ``timm:<name>`` backbones keep their own colon."""
    from ..models.backbones import check_backbone_name
    from ..models.segmentor import canonical_model_name

    model, sep, backbone = text.strip().partition(":")
    if not sep or not model or not backbone:
        raise ConfigError(f"{option} {text!r}: expected MODEL:BACKBONE, e.g. deeplabv3:resnet18 or segformer:mit_b0")
    try:
        model = canonical_model_name(model)
        check_backbone_name(backbone)
    except ValueError as e:
        raise ConfigError(f"{option} {text!r}: {e}") from None
    return model, backbone


def parse_pairs(text: str, option: str = "--students") -> tuple[Pair, ...]:
    """Comma-separated :func:`parse_pair` values."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{option} {text!r}: expected MODEL:BACKBONE[,MODEL:BACKBONE...]")
    return tuple(parse_pair(t, option) for t in items)


def describe(p: Preset) -> str:
    """The preset's description with the pairs it trains (which ``--teacher`` / ``--students`` may have changed)."""
    students = [pair_name(s) for s in p.students]
    listed = ", ".join(students[:-1]) + " and " + students[-1] if len(students) > 1 else students[0]
    return (f"{p.description}; a {pair_name(p.teacher)} teacher and the {listed} student"
            + ("s" if len(students) > 1 else ""))


def optimizer_overrides(backbone: str) -> dict[str, Any]:
    """``train`` keys for the backbone's published optimiser (``BackboneDefaults.optimizer``: AdamW for MobileViT
    and MiT), or none: the preset's SGD."""
    from ..models.backbones import backbone_defaults

    recipe = backbone_defaults(backbone).optimizer
    if recipe is None:
        return {}
    return {"optimizer": recipe.optimizer, "lr": recipe.lr, "weight_decay": recipe.weight_decay}


def describe_optimizer(cfg: ExperimentConfig, short: bool = False) -> str:
    """E.g. ``AdamW lr 0.0009, weight decay 0.01 (none on norms, biases and position terms): mobilevit_xxs's
    published recipe (CIRKD scripts/...)``; ``short``: ``AdamW lr 0.0009``."""
    from ..models.backbones._registry import OPTIMIZER_NAMES, backbone_defaults

    t = cfg.train
    name = OPTIMIZER_NAMES.get(t.optimizer, t.optimizer)
    if short:
        return f"{name} lr {t.lr:g}"
    text = f"{name} lr {t.lr:g}" + (f", momentum {t.momentum:g}" if t.optimizer == "sgd" else "")
    text += f", weight decay {t.weight_decay:g}"
    split = t.no_decay_norm_bias if t.no_decay_norm_bias is not None else t.optimizer == "adamw"
    if split:
        text += " (none on norms, biases and position terms)"
    recipe = backbone_defaults(cfg.model.backbone).optimizer
    overrides = optimizer_overrides(cfg.model.backbone)
    if recipe is not None and all(getattr(t, key) == value for key, value in overrides.items()):
        return text + f": {cfg.model.backbone}'s published recipe" + (f" ({recipe.source})" if recipe.source else "")
    return text + ": the preset's"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    image_size: tuple[int, int]
    n_train: int
    n_val: int
    crop_size: tuple[int, int]
    scale_range: tuple[float, float]
    teacher: Pair
    students: tuple[Pair, ...]
    teacher_iterations: int
    student_iterations: int
    batch_size: int
    lr: float
    """SGD's, for every model whose backbone declares no optimiser of its own (``BackboneDefaults.optimizer``:
    MobileViT and MiT train with their published AdamW recipe)."""
    val_every: int
    workers: int
    panels: int
    compile: bool | None = None
    """``train.compile`` for every run (None: the engine's default, on with CUDA)."""


PRESETS: dict[str, Preset] = {
    "small": Preset(
        name="small",
        description="a small preset for a 2-core CPU: 64×128 images, a few hundred iterations from scratch",
        # 64×128, teacher 300 / students 160 iterations (was 96×192, 300 / 240: 12.5 min on a 2-core CI machine) so
        # that the whole command stays within 5 minutes on 2 cores with CSKD clearly ahead (a 200-iteration teacher
        # gave +2.8 points only); measurements in docs/results-synthetic.md.
        image_size=(64, 128), n_train=200, n_val=40, crop_size=(64, 128), scale_range=(0.75, 1.5),
        teacher=("deeplabv3", "resnet18"), students=(("deeplabv3", "mobilenetv2"),),
        teacher_iterations=300, student_iterations=160, batch_size=8, lr=0.02, val_every=40, workers=1, panels=4,
    ),
    "paper": Preset(
        name="paper",
        description="256×512 images on a GPU, trained from scratch (by default the published pairs)",
        image_size=(256, 512), n_train=2000, n_val=200, crop_size=(256, 512), scale_range=(0.5, 2.0),
        teacher=("deeplabv3", "resnet101"),
        students=(("deeplabv3", "resnet18"), ("deeplabv3", "mobilenetv2"), ("pspnet", "resnet18")),
        teacher_iterations=2000, student_iterations=600, batch_size=8, lr=0.02, val_every=300, workers=8,
        panels=4,
        # Runs of a few hundred iterations spend longer compiling (~40 s per model and method on an H100) than
        # compilation saves them at 256×512, where steps are bound by kernel launches: see docs/benchmarks.md.
        compile=False,
    ),
    # For the test suite: seconds, not minutes; it checks that the whole pipeline runs, not what it learns.
    "tiny": Preset(
        name="tiny",
        description="a tiny preset for tests: 32×64 images, a handful of iterations",
        image_size=(32, 64), n_train=16, n_val=4, crop_size=(32, 64), scale_range=(0.75, 1.5),
        teacher=("deeplabv3", "resnet18"), students=(("deeplabv3", "mobilenetv2"),),
        teacher_iterations=6, student_iterations=4, batch_size=4, lr=0.02, val_every=2, workers=0, panels=2,
    ),
}


@dataclass(frozen=True)
class DemoPlan:
    preset: Preset
    out: Path
    data_root: Path
    methods: tuple[str, ...]
    seeds: int
    device: str
    teacher: ExperimentConfig
    students: dict[str, list[tuple[str, ExperimentConfig]]]
    """Per student name: (method, config) for every method and seed."""


def _base(preset: Preset, data_root: Path, device: str) -> dict[str, Any]:
    return {
        "data": {"dataset": "synthscapes", "root": str(data_root), "crop_size": list(preset.crop_size),
                 "scale_range": list(preset.scale_range), "workers": preset.workers,
                 "synthetic": {"train": preset.n_train, "val": preset.n_val, "size": list(preset.image_size),
                               "seed": 0}},
        "train": {"batch_size": preset.batch_size, "lr": preset.lr, "val_every": preset.val_every,
                  "log_every": max(1, min(20, preset.val_every)), "save_every": preset.val_every, "device": device,
                  "compile": preset.compile},
        "eval": {"batch_size": 8},  # synthetic images all have one size: batch them
    }


def plan(
    preset: str | Preset = "small",
    out: str | Path = "runs/demo",
    data_root: str | Path | None = None,
    methods: tuple[str, ...] = ("baseline", "cskd"),
    seeds: int = 1,
    device: str = "auto",
    teacher_iterations: int | None = None,
    student_iterations: int | None = None,
    students: tuple[Pair, ...] | None = None,
    compile: bool | None = None,
    teacher: Pair | None = None,
) -> DemoPlan:
    """The runs of one demo. ``students`` / ``teacher`` replace the preset's pairs ((model, backbone), e.g.
    ``("segformer", "mit_b0")``); a model whose backbone has a published optimiser (``BackboneDefaults.optimizer``)
    trains with it, every other with the preset's SGD."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if students:
        students = tuple(parse_pair(":".join(s), "--students") for s in students)
        names = [pair_name(s) for s in students]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"--students lists {', '.join(twice)} more than once")
        p = replace(p, students=students)
    if teacher:
        p = replace(p, teacher=parse_pair(":".join(teacher), "--teacher"))
    if teacher_iterations:
        p = replace(p, teacher_iterations=teacher_iterations)
    if student_iterations:
        p = replace(p, student_iterations=student_iterations)
    if compile is not None:
        p = replace(p, compile=compile)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "baseline" not in methods:
        methods = ("baseline", *methods)
    if seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {seeds}")
    out = Path(out)
    h, w = p.image_size
    data = Path(data_root) if data_root else Path("data") / f"synthscapes_{h}x{w}"
    base = _base(p, data, device)
    tm, tb = p.teacher
    teacher_raw = {**base, "name": "teacher", "model": {"model": tm, "backbone": tb},
                   "train": {**base["train"], **optimizer_overrides(tb),
                             "budget": {"iterations": p.teacher_iterations}, "seed": 0}}
    teacher = config_from_dict(teacher_raw, "demo teacher")
    # The digest covers the whole config (model, optimiser, sizes): another teacher never reuses this folder.
    teacher = replace(teacher, output_dir=str(out / f"teacher_{folder_name(p.teacher)}_{teacher.digest()[:8]}"))
    runs: dict[str, list[tuple[str, ExperimentConfig]]] = {}
    for sm, sb in p.students:
        name, folder = pair_name((sm, sb)), folder_name((sm, sb))
        runs[name] = []
        for method in methods:
            for seed in range(seeds):
                raw = {**base, "name": f"{folder}_{method}_seed{seed}", "method": method,
                       "output_dir": str(out / folder / method / f"seed{seed}"),
                       "model": {"model": sm, "backbone": sb},
                       "train": {**base["train"], **optimizer_overrides(sb),
                                 "budget": {"iterations": p.student_iterations}, "seed": seed}}
                if METHODS[method].is_distillation:
                    raw["teacher"] = {"model": tm, "backbone": tb, "weights": str(teacher.run_dir / "last.pt")}
                runs[name].append((method, config_from_dict(raw, f"demo {name} {method}")))
    return DemoPlan(p, out, data, tuple(methods), seeds, device, teacher, runs)


def run(demo: DemoPlan, progress: bool = True, command: str = "cskd demo") -> Path:
    """Train what is missing, one run at a time, then write ``<out>/report.md`` (and results.json, curves,
    panels). Runs go one after another: side by side on one GPU they were no faster (docs/benchmarks.md)."""
    start = time.time()
    demo.out.mkdir(parents=True, exist_ok=True)
    _say(f"cskd demo, preset '{demo.preset.name}': {describe(demo.preset)}")
    _say(f"[1/3] teacher {pair_name(demo.preset.teacher)} ({demo.preset.teacher_iterations} iterations, "
         f"{describe_optimizer(demo.teacher, short=True)}) "
         f"→ {demo.teacher.run_dir}")
    teacher = run_one(demo.teacher, "teacher", progress)
    if not teacher.ok:
        raise ConfigError(f"the teacher run failed ({teacher.error}); see {teacher.run_dir / 'failed.json'}")
    todo = [(student, method, cfg) for student, cfgs in demo.students.items() for method, cfg in cfgs]
    records: dict[str, list[RunRecord]] = {student: [] for student in demo.students}
    for i, (student, method, cfg) in enumerate(todo, 1):
        _say(f"[2/3] student {i}/{len(todo)}: {student} ({describe_optimizer(cfg, short=True)}), {method}, "
             f"seed {cfg.train.seed} → {cfg.run_dir}")
        records[student].append(run_one(cfg, method, progress))
    _say("[3/3] report: predictions, curves, tables")
    report = write_report(demo, teacher, records, command, time.time() - start)
    _say(f"report: {report}")
    return report


def _compile_text(compile: bool | None) -> str:
    return {True: "on", False: "off"}.get(compile, "on with CUDA, off on the CPU")  # type: ignore[arg-type]


def _say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------ report


def write_report(
    demo: DemoPlan, teacher: RunRecord, records: dict[str, list[RunRecord]], command: str, seconds: float,
) -> Path:
    out = demo.out
    p = demo.preset
    lines = [
        f"# CSKD on synthetic street scenes — preset `{p.name}`",
        "",
        f"**{'This is a small preset' if p.name != 'paper' else 'Preset'}: {describe(p)}.** "
        "Numbers from such short from-scratch runs on synthetic data show the mechanics and relative effects, not "
        "the published Cityscapes results.",
        "",
        f"Command: `{command}`  ",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in environment().items()) + "  ",
        f"Data: {p.n_train} train / {p.n_val} val synthetic images at {p.image_size[0]}×{p.image_size[1]} "
        f"(`{demo.data_root}`), crops {p.crop_size[0]}×{p.crop_size[1]}, batch {p.batch_size}, "
        f"teacher {p.teacher_iterations} and students {p.student_iterations} iterations, {demo.seeds} seed(s), "
        f"torch.compile {_compile_text(p.compile)}.  ",
        f"Wall time of this command: {seconds / 60:.1f} min (runs found finished were not retrained).",
        "",
        "Optimisers (poly learning-rate decay, power 0.9; every method of a network uses its network's):",
        "",
        *_optimizer_lines(demo),
        "",
        "## Validation mIoU",
        "",
        "Final model of each run (no checkpoint selection on the validation split); mean ± std over seeds where "
        "there are several. Δ is against the same student without distillation. Training seconds count the "
        "training steps only (evaluation and checkpoints excluded): a method that slows the step spends more.",
        "",
    ]
    rows = [[pair_name(p.teacher) + " (teacher)", "—", fmt_pct(teacher.miou or math.nan), "—",
             f"{teacher.train_seconds:.0f}", f"{teacher.images_per_second:.1f}"]]
    summary: dict[str, Any] = {"preset": asdict(p), "command": command, "environment": environment(),
                               "teacher": _record_json(teacher), "students": {},
                               "optimizers": {"teacher": _optimizer_json(demo.teacher),
                                              **{name: _optimizer_json(cfgs[0][1])
                                                 for name, cfgs in demo.students.items() if cfgs}}}
    for student, recs in records.items():
        by_method = group_records(recs)
        base = [r.miou for r in by_method.get("baseline", []) if r.ok and r.miou is not None]
        base_mean = mean_std(base)[0] if base else math.nan
        summary["students"][student] = {}
        for method, rs in by_method.items():
            ok = [r for r in rs if r.ok and r.miou is not None]
            m, s = mean_std([r.miou for r in ok])
            delta = "—" if method == "baseline" or math.isnan(base_mean) or not ok else f"{100 * (m - base_mean):+.2f}"
            secs = mean_std([r.train_seconds for r in ok])[0] if ok else math.nan
            ips = mean_std([r.images_per_second for r in ok])[0] if ok else math.nan
            failed = len(rs) - len(ok)
            shown = fmt_pct(m, s if len(ok) > 1 else None) + (f" ({failed} failed)" if failed else "")
            rows.append([student, method, shown, delta, f"{secs:.0f}", f"{ips:.1f}"])
            summary["students"][student][method] = [_record_json(r) for r in rs]
    lines += [markdown_table(["network", "method", "mIoU (%)", "Δ mIoU", "train s", "img/s"], rows), ""]

    lines += ["## Per-class IoU (%), seed 0", ""]
    names = teacher.class_names
    header = ["class", pair_name(p.teacher) + " (teacher)"]
    cols: list[list[float | None]] = [teacher.class_iou]
    for student, recs in records.items():
        for r in recs:
            if r.seed == 0 and r.ok:
                header.append(f"{student} {r.group}")
                cols.append(r.class_iou)
    class_rows = [[n] + [fmt_pct(c[i]) if i < len(c) and c[i] is not None else "n/a" for c in cols]
                  for i, n in enumerate(names)]
    lines += [markdown_table(header, class_rows), ""]

    lines += ["## Training curves", ""]
    for student, recs in records.items():
        groups = {"teacher": [teacher], **group_records(recs)}
        png = plot_curves(groups, out / f"curves_{_safe(student)}.png",
                          title=f"{student} (teacher: {pair_name(p.teacher)})")
        lines += [f"![{student}]({png.name})", ""]

    lines += ["## Predictions on validation images", "",
              "Each row: image | ground truth | teacher | each student method (seed 0).", ""]
    for student, recs in records.items():
        png = _panels(demo, teacher, [r for r in recs if r.seed == 0 and r.ok], out / f"panels_{_safe(student)}.png")
        if png is not None:
            lines += [f"![{student}]({png.name})", ""]
    failed = [r for rs in records.values() for r in rs if not r.ok]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {r.name}: {r.error}" for r in failed] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "results.json").write_text(dumps(summary, indent=2))
    return report


def _optimizer_lines(demo: DemoPlan) -> list[str]:
    lines = [f"- {pair_name(demo.preset.teacher)} (teacher): {describe_optimizer(demo.teacher)}"]
    lines += [f"- {name}: {describe_optimizer(cfgs[0][1])}" for name, cfgs in demo.students.items() if cfgs]
    return lines


def _optimizer_json(cfg: ExperimentConfig) -> dict[str, Any]:
    t = cfg.train
    return {"optimizer": t.optimizer, "lr": t.lr, "weight_decay": t.weight_decay,
            "no_decay_norm_bias": t.no_decay_norm_bias, "text": describe_optimizer(cfg)}


def _record_json(r: RunRecord) -> dict[str, Any]:
    d = asdict(r)
    d["run_dir"] = str(r.run_dir)
    return d


@torch.inference_mode()
def _panels(demo: DemoPlan, teacher: RunRecord, students: list[RunRecord], path: Path) -> Path | None:
    from PIL import Image

    from ..data import build_dataset, build_eval_transform
    from ..data.normalize import normalize
    from ..distributed import resolve_device
    from ..checkpoints.loading import load_model
    from ..evaluation import predict_logits
    from ..outputs.maps import colorize, make_panel

    val = build_dataset("synthscapes", demo.data_root, "val", build_eval_transform())
    n = min(demo.preset.panels, len(val))
    if n == 0:
        return None
    device = resolve_device(demo.device)
    runs = [("teacher", teacher)] + [(r.group, r) for r in students]
    models = []
    for label, r in runs:
        net = load_model(r.run_dir / "last.pt").model.to(device).eval()
        models.append((label, net))
    rows = []
    for i in range(n):
        sample = val[i]
        x = normalize(sample["image"].unsqueeze(0).to(device))
        tiles = [sample["image"], colorize(sample["mask"], val.palette)]
        for _, net in models:
            pred = predict_logits(net, x).argmax(1)[0].to(torch.uint8).cpu()
            tiles.append(colorize(pred, val.palette))
        row = make_panel(tiles, ["image", "ground truth"] + [label for label, _ in models])
        scale = max(1, 1600 // row.width)  # small presets' images are tiny: enlarge (pixels stay crisp)
        rows.append(row.resize((row.width * scale, row.height * scale), Image.NEAREST) if scale > 1 else row)
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    sheet.save(path)
    return path


__all__ = ["DemoPlan", "PRESETS", "Preset", "describe", "describe_optimizer", "folder_name", "optimizer_overrides",
           "pair_name", "parse_pair", "parse_pairs", "plan", "run", "write_report"]
