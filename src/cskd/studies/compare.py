"""Comparing distillation methods fairly: at equal iterations *and* at equal training time.

Published comparisons give every method the same number of iterations, but a distillation term that slows the
step hands its method more compute. ``cskd compare`` runs each method on the same data, teacher, student
initialisation and seeds under two budgets:

- ``iterations``: the config's iteration count for every method (the papers' protocol);
- ``time``: the same number of training seconds for every method (GPU seconds on a GPU). Each run times its own
  step and data loader first (a short calibration) and fixes its iteration count, so its poly schedule still
  ends at zero.
  The default time is what the *reference* method (``--time-reference``, default ``kd``: the teacher's forward
  plus a near-free logit term) spent in the iteration budget.

Reports: one table per budget (Markdown, CSV, JSON), mIoU against training time and against iterations (PNG), the
exact command, config hashes, library versions and device. Re-running the same command skips finished runs and
resumes an interrupted one; a method that fails is reported as failed and the others go on.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.config import ExperimentConfig, load_config
from ..engine.records import dumps
from ..errors import ConfigError
from ..losses.methods import METHODS
from ..timing import environment
from .runs import (
    RunRecord, fmt_pct, group_records, markdown_table, mean_std, plot_curves, run_one,
)

BUDGETS = ("iterations", "time")


@dataclass(frozen=True)
class ComparePlan:
    base: ExperimentConfig
    config_path: str
    methods: tuple[str, ...]
    seeds: int
    budgets: tuple[str, ...]
    out: Path
    gpu_seconds: float | None
    time_reference: str
    val_points: int
    loss_overrides: tuple[str, ...] = ()
    """``--set losses.N.key=value``: applied to each method's own terms (see :func:`run_config`)."""


def plan(
    config: str | Path,
    methods: tuple[str, ...],
    seeds: int = 3,
    budgets: tuple[str, ...] = BUDGETS,
    out: str | Path | None = None,
    gpu_seconds: float | None = None,
    time_reference: str = "kd",
    val_points: int = 8,
    overrides: tuple[str, ...] = (),
) -> ComparePlan:
    loss_overrides = tuple(o for o in overrides if _is_loss_override(o))
    base = load_config(config, tuple(o for o in overrides if not _is_loss_override(o)))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods) or not methods:
        raise ConfigError(f"--methods needs distinct method names, got {methods}")
    if any(METHODS[m].is_distillation for m in methods) and base.teacher is None:
        raise ConfigError(f"{config}: the config has no 'teacher' block, which the distillation methods need")
    if base.train.budget.iterations is None:
        raise ConfigError(f"{config}: set train.budget.iterations: the iteration budget every method gets")
    bad = [b for b in budgets if b not in BUDGETS]
    if bad or not budgets:
        raise ConfigError(f"--budget: choose from {', '.join(BUDGETS)} (or both), got {','.join(budgets)}")
    if "time" in budgets and gpu_seconds is None:
        if "iterations" not in budgets:
            raise ConfigError("--budget time alone needs --gpu-seconds (or include the iteration budget, whose "
                              f"'{time_reference}' runs set the time)")
        if time_reference not in methods:
            raise ConfigError(f"--time-reference {time_reference} is not among --methods {','.join(methods)}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {seeds}")
    return ComparePlan(base, str(config), tuple(methods), seeds, tuple(budgets),
                       Path(out) if out else Path("runs") / f"compare_{base.name}", gpu_seconds, time_reference,
                       val_points, loss_overrides)


def _is_loss_override(text: str) -> bool:
    return text.split("=", 1)[0].split(".")[0] == "losses"


def _loss_index(text: str) -> int | None:
    parts = text.split("=", 1)[0].split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def run_config(plan: ComparePlan, budget: str, method: str, seed: int, gpu_seconds: float | None) -> ExperimentConfig:
    """The config of one run: the base config with this method's losses, this seed, this budget."""
    from ..engine.config import config_from_dict

    raw = plan.base.to_dict()
    raw.pop("losses", None)
    raw["method"] = method
    raw["name"] = f"{plan.base.name}_{budget}_{method}_seed{seed}"
    raw["output_dir"] = str(plan.out / budget / method / f"seed{seed}")
    raw["train"]["seed"] = seed
    raw["train"]["val_points"] = plan.val_points
    if budget == "time":
        raw["train"]["budget"] = {**raw["train"]["budget"], "iterations": None, "gpu_seconds": gpu_seconds}
    if not METHODS[method].is_distillation:
        raw["teacher"] = None
    where = f"{plan.config_path} ({budget}, {method}, seed {seed})"
    # A method's terms are rebuilt from its name, so --set losses.N.key=value is applied here, to each method whose
    # recipe has a term N (e.g. losses.1.lambda_cam reaches cskd's second term and leaves kd's single term alone).
    applies = [o for o in plan.loss_overrides
               if _loss_index(o) is None or _loss_index(o) < len(METHODS[method].losses)]
    if applies:
        from ..engine.config import apply_overrides, expand_method

        raw = apply_overrides(expand_method(raw, applies), applies)
        where += " (with --set overrides)"
    return config_from_dict(raw, where)


def run(plan: ComparePlan, progress: bool = True, command: str = "cskd compare") -> Path:
    plan.out.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[RunRecord]] = {}
    gpu_seconds = plan.gpu_seconds
    for budget in plan.budgets:
        if budget == "time" and gpu_seconds is None:
            ref = [r for r in records.get("iterations", []) if r.group == plan.time_reference and r.ok]
            if not ref:
                raise ConfigError(f"no finished '{plan.time_reference}' run in the iteration budget to set the time "
                                  "budget from; pass --gpu-seconds")
            gpu_seconds = mean_std([r.train_seconds for r in ref])[0]
            print(f"time budget: {gpu_seconds:.1f} s per run (the mean training time of "
                  f"'{plan.time_reference}' in the iteration budget)", flush=True)
        records[budget] = []
        for method in plan.methods:
            for seed in range(plan.seeds):
                cfg = run_config(plan, budget, method, seed, gpu_seconds)
                print(f"[{budget}] {method}, seed {seed} → {cfg.run_dir}", flush=True)
                records[budget].append(run_one(cfg, method, progress))
    return write_report(plan, records, gpu_seconds, command)


# ------------------------------------------------------------------------------------------------ report


def _rows(recs: list[RunRecord], methods: tuple[str, ...]) -> list[dict[str, Any]]:
    by = group_records(recs)
    base = [r.miou for r in by.get("baseline", []) if r.ok and r.miou is not None]
    base_mean = mean_std(base)[0] if base else math.nan
    rows = []
    for m in methods:
        rs = by.get(m, [])
        ok = [r for r in rs if r.ok and r.miou is not None]
        mean, std = mean_std([r.miou for r in ok])
        rows.append({
            "method": m,
            "runs": len(rs),
            "failed": len(rs) - len(ok),
            "errors": [r.error for r in rs if not r.ok],
            "iterations": mean_std([r.iterations for r in ok])[0] if ok else math.nan,
            "train_seconds": mean_std([r.train_seconds for r in ok])[0] if ok else math.nan,
            "planned_seconds": mean_std([r.planned_seconds for r in ok if r.planned_seconds])[0]
            if any(r.planned_seconds for r in ok) else None,
            "images_per_second": mean_std([r.images_per_second for r in ok])[0] if ok else math.nan,
            "miou_mean": mean,
            "miou_std": std,
            "miou_per_seed": [r.miou for r in rs],
            "delta_vs_baseline": mean - base_mean if ok and not math.isnan(base_mean) and m != "baseline" else None,
            "config_digests": sorted({r.config_digest for r in rs}),
        })
    return rows


def write_report(plan: ComparePlan, records: dict[str, list[RunRecord]], gpu_seconds: float | None, command: str) -> Path:
    env = environment()
    lines = [
        f"# Method comparison: `{plan.base.name}`",
        "",
        f"Command: `{command}`  ",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ",
        f"Config: `{plan.config_path}` (digest {plan.base.digest()}); student {plan.base.model.model}-"
        f"{plan.base.model.backbone}"
        + (f", teacher {plan.base.teacher.model}-{plan.base.teacher.backbone} "
           f"(`{plan.base.teacher.weights}`)" if plan.base.teacher else "")
        + f"; {plan.seeds} seed(s) per method; the same seeds give every method the same student initialisation "
          "and data order.",
        "",
        "mIoU: final model on the validation split (no selection on it), mean ± std over seeds. Training seconds: "
        "step time only (synchronised on the GPU; evaluation and checkpoints excluded).",
        "",
    ]
    machine: dict[str, Any] = {"command": command, "environment": env, "config": plan.config_path,
                               "config_digest": plan.base.digest(), "budgets": {}}
    for budget, recs in records.items():
        rows = _rows(recs, plan.methods)
        machine["budgets"][budget] = {"gpu_seconds": gpu_seconds if budget == "time" else None, "rows": rows}
        if budget == "iterations":
            lines += [f"## Equal iterations ({plan.base.train.budget.iterations} per run)", ""]
        else:
            lines += [f"## Equal training time ({gpu_seconds:.1f} s per run)", "",
                      "Each run timed its own step before training and set its iteration count from it.", ""]
        table = []
        for r in rows:
            miou = fmt_pct(r["miou_mean"], r["miou_std"] if plan.seeds > 1 else None)
            if r["failed"]:
                miou = f"{miou} ({r['failed']}/{r['runs']} failed)" if r["failed"] < r["runs"] else "failed"
            delta = "—" if r["delta_vs_baseline"] is None else f"{100 * r['delta_vs_baseline']:+.2f}"
            table.append([r["method"], _num(r["iterations"], 0), _num(r["train_seconds"], 1),
                          _num(r["images_per_second"], 1), miou, delta])
        lines += [markdown_table(["method", "iterations", "train s", "img/s", "val mIoU (%)", "Δ vs baseline"],
                                 table), ""]
        failed = [r for r in recs if not r.ok]
        for r in failed:
            lines.append(f"- failed: {r.name}: {r.error}")
        if failed:
            lines.append("")
        groups = group_records(recs)
        t_png = plot_curves(groups, plan.out / f"miou_vs_time_{budget}.png", x="seconds",
                            title=f"{plan.base.name}: {budget} budget")
        i_png = plot_curves(groups, plan.out / f"miou_vs_iterations_{budget}.png", x="iteration",
                            title=f"{plan.base.name}: {budget} budget")
        lines += [f"![mIoU against training time]({t_png.name})", "", f"![mIoU against iterations]({i_png.name})", ""]
        _write_csv(plan.out / f"table_{budget}.csv", rows)
    (plan.out / "results.json").write_text(dumps(machine, indent=2))
    report = plan.out / "report.md"
    report.write_text("\n".join(lines))
    print(f"report: {report}", flush=True)
    return report


def _num(v: float, digits: int) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = ["method", "runs", "failed", "iterations", "train_seconds", "planned_seconds", "images_per_second",
              "miou_mean", "miou_std", "delta_vs_baseline"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


__all__ = ["BUDGETS", "ComparePlan", "plan", "run", "run_config", "write_report"]
