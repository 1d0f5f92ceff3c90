"""Running sets of experiments (the demo, method comparisons) and summarising them: resumable, failure-tolerant,
with tables and plots from the runs' own logs.

A set of runs is a list of configs with distinct output folders. Started again with the same configs, finished runs
are read back instead of trained, an interrupted run resumes from its ``last.pt``, and a run that failed (e.g. a
non-finite loss) is reported as failed, not retried, while the others go on.
"""

from __future__ import annotations

import json
import math
import statistics
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.config import ExperimentConfig, save_config
from ..engine.records import read_records
from ..errors import ConfigError, CskdError

FAILED_MARKER = "failed.json"


@dataclass
class RunRecord:
    """What a finished (or failed) run left behind, read from its folder."""

    name: str
    group: str
    """What the run stands for in a table (a method name, "teacher", ...)."""
    seed: int
    run_dir: Path
    status: str  # "done" or "failed"
    error: str | None = None
    iterations: int = 0
    train_seconds: float = 0.0
    planned_seconds: float | None = None
    eval_seconds: float = 0.0
    images_per_second: float = 0.0
    miou: float | None = None
    """Validation mIoU of the final model (what the tables report: no selection on the validation split)."""
    class_iou: list[float | None] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    val_curve: list[tuple[int, float, float]] = field(default_factory=list)
    """(iteration, training seconds so far, val mIoU) at each evaluation."""
    loss_curve: list[tuple[int, float, float]] = field(default_factory=list)
    """(iteration, training seconds so far, mean total loss since the previous point)."""
    config_digest: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "done"


def is_finished(run_dir: Path) -> bool:
    summary = read_records(run_dir / "log.jsonl", "summary")
    return bool(summary) and (run_dir / "metrics.json").exists()


def read_run(cfg: ExperimentConfig, group: str) -> RunRecord:
    run_dir = cfg.run_dir
    rec = RunRecord(name=cfg.name, group=group, seed=cfg.train.seed, run_dir=run_dir, status="done",
                    config_digest=cfg.digest())
    failed = run_dir / FAILED_MARKER
    if failed.exists():
        rec.status, rec.error = "failed", json.loads(failed.read_text()).get("error", "failed")
        return rec
    summary = read_records(run_dir / "log.jsonl", "summary")[-1]
    rec.iterations = int(summary["iterations"])
    rec.train_seconds = float(summary["train_seconds"])
    rec.planned_seconds = summary.get("planned_seconds")
    rec.eval_seconds = float(summary.get("eval_seconds") or 0.0)
    rec.images_per_second = float(summary.get("images_per_second") or 0.0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rec.miou = metrics.get("miou")
    rec.class_iou = [c.get("iou") for c in metrics.get("classes", [])]
    rec.class_names = [c.get("name") for c in metrics.get("classes", [])]
    rec.val_curve = [(r["iteration"], r.get("train_seconds", 0.0), r["miou"])
                     for r in read_records(run_dir / "log.jsonl", "val") if r.get("miou") is not None]
    rec.loss_curve = [(r["iteration"], r.get("train_seconds", 0.0), math.nan if r["loss"] is None else r["loss"])
                      for r in read_records(run_dir / "log.jsonl", "train") if "loss" in r]
    return rec


def run_one(cfg: ExperimentConfig, group: str, progress: bool = True, retry_failed: bool = False) -> RunRecord:
    """Train ``cfg`` unless its folder already holds the finished run; resume it if interrupted; record a failure
    instead of raising, so that the other runs of a set go on."""
    from ..engine.runlock import RunInUseError
    from ..engine.trainer import Trainer

    run_dir = cfg.run_dir
    _check_same_config(cfg)
    failed = run_dir / FAILED_MARKER
    if failed.exists() and retry_failed:
        failed.unlink()
    if is_finished(run_dir) or failed.exists():
        return read_run(cfg, group)
    try:
        resume = "auto" if (run_dir / "last.pt").exists() else None
        Trainer(cfg, resume=resume, progress=progress, overwrite=True).fit()
    except RunInUseError:
        raise  # another process is training this run: neither a failure of the method nor this process's to record
    except (CskdError, RuntimeError, ValueError) as e:  # a method that breaks must not stop the others
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        failed.write_text(json.dumps({"error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()}, indent=2))
    return read_run(cfg, group)


def _check_same_config(cfg: ExperimentConfig) -> None:
    """A folder holding a run of another config must not be mistaken for this run (nor resumed as it)."""
    from ..engine.config import config_from_dict, read_yaml

    saved = cfg.run_dir / "config.yaml"
    if not saved.exists():
        return
    try:
        old = config_from_dict(read_yaml(saved), str(saved))
    except CskdError:
        old = None
    if old is None or old.digest() != cfg.digest():
        raise ConfigError(
            f"{cfg.run_dir} holds a run of a different configuration ({saved}); use another output folder or "
            "delete that one to start over"
        )


# ------------------------------------------------------------------------------------------------ summaries


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def fmt_pct(mean: float, std: float | None = None, digits: int = 2) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    text = f"{100 * mean:.{digits}f}"
    if std is not None and not math.isnan(std):
        text += f" ± {100 * std:.{digits}f}"
    return text


def group_records(records: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    out: dict[str, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.group, []).append(r)
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(
    groups: dict[str, list[RunRecord]], path: Path, *, x: str = "iteration", title: str = "",
) -> Path:
    """Val mIoU (left) and training loss (right) against ``x`` ("iteration" or "seconds"), one colour per group,
    one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xi = 0 if x == "iteration" else 1
    fig, (ax_miou, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (group, recs) in enumerate(groups.items()):
        c = colours[i % len(colours)]
        for j, r in enumerate(r for r in recs if r.ok):
            label = group if j == 0 else None
            if r.val_curve:
                ax_miou.plot([p[xi] for p in r.val_curve], [100 * p[2] for p in r.val_curve], "-o", color=c,
                             ms=3, lw=1.2, alpha=0.85, label=label)
            if r.loss_curve:
                ax_loss.plot([p[xi] for p in r.loss_curve], [p[2] for p in r.loss_curve], color=c, lw=1.0,
                             alpha=0.7, label=label)
    xlabel = "iteration" if x == "iteration" else "training seconds (step time only)"
    ax_miou.set(xlabel=xlabel, ylabel="val mIoU (%)", title="validation mIoU")
    ax_loss.set(xlabel=xlabel, ylabel="total training loss", title="training loss", yscale="log")
    for ax in (ax_miou, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["RunRecord", "fmt_pct", "group_records", "is_finished", "markdown_table", "mean_std",
           "plot_curves", "read_run", "run_one"]
