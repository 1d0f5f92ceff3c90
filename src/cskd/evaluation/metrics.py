"""Segmentation metrics from one confusion matrix, accumulated on the device.

Conventions (they differ from the published CSKD code in two places, see below):

- Rows of the matrix are ground truth, columns prediction; ``mat[g, p]`` counts labelled pixels.
- A pixel whose label is the ignore value (255) never counts, whatever is predicted there.
- IoU of class *c* = TP / (TP + FP + FN) over the whole split (not averaged per image). A class that appears neither
  in the ground truth nor in the prediction of the whole split has no IoU (NaN, shown "n/a") and is left out of
  the mean: ``miou`` is a NaN-mean. This is the convention of the official Cityscapes evaluator
  (``cityscapesscripts``) and of torchmetrics' ``MulticlassJaccardIndex(average="macro")``. A class predicted
  somewhere but absent from the ground truth has IoU 0 and does count.
- Class accuracy (recall) of class *c* = TP / (TP + FN); NaN for a class absent from the ground truth, and
  ``mean_acc`` is the NaN-mean.
- Frequency-weighted IoU = Σ_c freq_c · IoU_c with freq_c the share of labelled pixels of class *c*.

Differences from the published code (``utils/score.py``, used by ``eval.py``):

- Its mIoU divides by ``union + eps`` and averages over *all* classes, so a class absent from the split counts as
  IoU 0 and pulls the mean down. We report that number too, as ``miou_all_classes``; on Cityscapes val all 19
  classes occur, so the two agree there and the published figures stay comparable.
- Its pixel accuracy takes ``argmax(output.long(), 1)``: the logits are truncated to integers *before* the argmax,
  so the prediction it scores is not the one its mIoU scores (close logits tie, and ties go to the lowest class).
  Ours scores the same ``argmax`` of the float logits for every number.

JSON / CSV hold fractions in [0, 1] (``null`` / empty for n/a); the printed and Markdown tables show percentages.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..constants import IGNORE_INDEX
from ..errors import DataError


class ConfusionMatrix:
    """A K×K int64 confusion matrix that lives on ``device``; :meth:`update` adds a batch without leaving it.

    ``update`` accepts predictions and targets of equal shape (any integer dtype, e.g. B×H×W uint8 or int64).
    Targets must hold class ids ``0..K-1`` or ``ignore_index``; any other value (a label the dataset does not map,
    a model predicting more classes than the dataset has) raises :class:`~cskd.errors.DataError` naming the values,
    because silently dropping such pixels would make every number wrong without a trace. Predictions must hold
    ``0..K-1`` wherever the target is labelled.

    On the CPU each update checks at once and names the bad values. Elsewhere an update costs no host
    synchronisation (``torch.bincount`` on CUDA reads the maximum index back, so the counts are scattered into fixed
    bins instead, :func:`spread_counts`) and invalid pixels are counted on the device: :meth:`compute` raises for
    them, with their numbers and the smallest and largest bad value. ``check_each_update`` forces either
    behaviour.
    """

    lanes: int = 1024
    """Copies of the bins the sync-free path scatters into (see :func:`spread_counts`); 1: one set of bins."""

    def __init__(
        self, num_classes: int, device: torch.device | str | None = None, ignore_index: int = IGNORE_INDEX,
        check_each_update: bool | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.check_each_update = self.mat.device.type == "cpu" if check_each_update is None else check_each_update
        self._invalid = torch.zeros(2, dtype=torch.int64, device=device)
        """Deferred check: label pixels outside 0..K-1 and ≠ ignore, predicted ids outside 0..K-1 (labelled)."""
        self._lowest = torch.full((2,), _NO_LOW, dtype=torch.int32, device=device)
        self._highest = torch.full((2,), _NO_HIGH, dtype=torch.int32, device=device)
        """The smallest and largest of those bad label values and predicted ids, for the deferred error."""

    @property
    def device(self) -> torch.device:
        return self.mat.device

    def reset(self) -> None:
        self.mat.zero_()
        self._invalid.zero_()
        self._lowest.fill_(_NO_LOW)
        self._highest.fill_(_NO_HIGH)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}; pass class ids "
                "(logits.argmax(1)) resized to the label size"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(f"expected integer class ids, got {pred.dtype} predictions and {target.dtype} targets")
        k = self.num_classes
        # int32 indices: K² < 2³¹ for any K this metric is meant for, and half the memory of int64 at 2 MPixel.
        t = target.reshape(-1).to(device=self.device, dtype=torch.int32)
        p = pred.reshape(-1).to(device=self.device, dtype=torch.int32)
        ignored = t == self.ignore_index
        t_ok = (t >= 0) & (t < k)
        good = t_ok & (p >= 0) & (p < k)
        # Extra bins instead of boolean indexing: masking would need a device→host sync to size its result.
        # k²: ignored; k² + 1: a bad label; k² + 2: a bad prediction under a good label.
        index = torch.where(good, t * k + p, torch.where(ignored, k * k, torch.where(t_ok, k * k + 2, k * k + 1)))
        if self.check_each_update:
            counts = torch.bincount(index, minlength=k * k + 3)
            if counts[k * k + 1:].any().item():
                self._raise_invalid(p, t, good | ignored)
        else:  # a scatter into fixed bins: no device→host sync (unlike bincount on CUDA)
            counts = spread_counts(index, k * k + 3, self.lanes)
            self._invalid += counts[k * k + 1:]
            self._track_extremes(t, p, ~t_ok & ~ignored, t_ok & ~good)
        self.mat += counts[: k * k].view(k, k)

    def _track_extremes(self, t: Tensor, p: Tensor, bad_t: Tensor, bad_p: Tensor) -> None:
        for row, (values, bad) in enumerate(((t, bad_t), (p, bad_p))):
            self._lowest[row] = torch.minimum(self._lowest[row], torch.where(bad, values, _NO_LOW).amin())
            self._highest[row] = torch.maximum(self._highest[row], torch.where(bad, values, _NO_HIGH).amax())

    def _raise_invalid(self, p: Tensor, t: Tensor, ok: Tensor) -> None:
        bad_t = t[~ok & ~((t >= 0) & (t < self.num_classes))]
        bad_p = p[~ok & (t >= 0) & (t < self.num_classes)]
        parts = []
        if bad_t.numel():
            vals = torch.unique(bad_t).tolist()[:10]
            parts.append(f"{bad_t.numel()} label pixels hold values {vals} outside 0..{self.num_classes - 1} "
                         f"and ≠ ignore {self.ignore_index} (check the dataset's label mapping and num_classes)")
        if bad_p.numel():
            vals = torch.unique(bad_p).tolist()[:10]
            parts.append(f"{bad_p.numel()} predicted pixels hold class ids {vals} outside 0..{self.num_classes - 1} "
                         "(does the model predict the dataset's number of classes?)")
        raise DataError("confusion matrix: " + "; ".join(parts))

    def reduce_(self) -> ConfusionMatrix:
        """Sum the matrices of all ranks in place (when ``torch.distributed`` is initialised; no-op otherwise)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)
            dist.all_reduce(self._invalid, op=dist.ReduceOp.SUM)  # every rank raises, or none
            dist.all_reduce(self._lowest, op=dist.ReduceOp.MIN)
            dist.all_reduce(self._highest, op=dist.ReduceOp.MAX)
        return self

    def compute(self) -> SegMetrics:
        self._check_deferred()
        return SegMetrics.from_confusion(self.mat)

    def _check_deferred(self) -> None:
        bad_t, bad_p = self._invalid.tolist()
        if not (bad_t or bad_p):
            return
        k = self.num_classes
        (lo_t, lo_p), (hi_t, hi_p) = self._lowest.tolist(), self._highest.tolist()
        parts = []
        if bad_t:
            parts.append(f"{bad_t} label pixels hold values {_span(lo_t, hi_t)} outside 0..{k - 1} and ≠ ignore "
                         f"{self.ignore_index} (check the dataset's label mapping and num_classes)")
        if bad_p:
            parts.append(f"{bad_p} predicted pixels hold class ids {_span(lo_p, hi_p)} outside 0..{k - 1} (does the "
                         "model predict the dataset's number of classes?)")
        raise DataError("confusion matrix: " + "; ".join(parts))


_NO_LOW, _NO_HIGH = torch.iinfo(torch.int32).max, torch.iinfo(torch.int32).min


_SPREAD_COUNTS = 1 << 20


def spread_counts(index: Tensor, bins: int, lanes: int) -> Tensor:
    """int64 counts of each value ``0..bins-1`` of the flat integer ``index``, without a host synchronisation.

    Element *i* is scattered into copy *i* mod ``lanes`` of the bins, and the copies are summed afterwards. A
    label map sends most pixels to a few bins (road, sky; a random-weight model predicts one class everywhere): with
    one set of bins, an accelerator's atomic adds on those few addresses serialise, while with the copies
    neighbouring pixels (one warp) never share an address. Integer sums: exact and independent of the order. The
    copies hold at most 2²⁰ counts together (8 MB): fewer copies for many classes (ADE20K's 150² bins get 46),
    whose pixels spread over more bins anyway."""
    n = index.numel()
    lanes = max(1, min(lanes, n, _SPREAD_COUNTS // bins))
    spread = torch.arange(n, device=index.device).remainder_(lanes).mul_(bins).add_(index.reshape(-1))
    ones = torch.ones((), dtype=torch.int64, device=index.device).expand(n)
    counts = torch.zeros(lanes * bins, dtype=torch.int64, device=index.device).scatter_add_(0, spread, ones)
    return counts.view(lanes, bins).sum(0)


def _span(lowest: int, highest: int) -> str:
    return f"[{lowest}]" if lowest == highest else f"from {lowest} to {highest}"


def _nanmean(values: Tensor) -> float:
    ok = ~torch.isnan(values)
    return float(values[ok].mean()) if bool(ok.any()) else math.nan


@dataclass(frozen=True)
class SegMetrics:
    """All numbers are fractions in [0, 1]; per-class tuples hold NaN where a class is n/a (see module docs)."""

    miou: float
    """Mean IoU over the classes present in the ground truth or the prediction (NaN-mean)."""
    iou: tuple[float, ...]
    acc: tuple[float, ...]
    """Per-class accuracy (recall): TP / (TP + FN); NaN for classes absent from the ground truth."""
    pixel_acc: float
    mean_acc: float
    fwiou: float
    miou_all_classes: float
    """The published code's convention: IoU averaged over all classes, absent classes counted as 0."""
    num_pixels: int
    """Labelled (non-ignored) pixels that were scored."""
    confusion: tuple[tuple[int, ...], ...] = field(repr=False)
    """Rows ground truth, columns prediction."""

    @classmethod
    def from_confusion(cls, mat: Tensor) -> SegMetrics:
        m = mat.detach().to("cpu", torch.float64)
        tp = m.diagonal()
        gt = m.sum(1)
        pred = m.sum(0)
        total = m.sum()
        union = gt + pred - tp
        nan = torch.full_like(tp, math.nan)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        if total > 0:
            freq = gt / total
            fwiou = float((freq[gt > 0] * iou[gt > 0]).sum())
            pixel_acc = float(tp.sum() / total)
        else:
            fwiou = pixel_acc = math.nan
        return cls(
            miou=_nanmean(iou),
            iou=tuple(iou.tolist()),
            acc=tuple(acc.tolist()),
            pixel_acc=pixel_acc,
            mean_acc=_nanmean(acc),
            fwiou=fwiou,
            miou_all_classes=float(torch.nan_to_num(iou, nan=0.0).mean()),
            num_pixels=int(total),
            confusion=tuple(tuple(int(v) for v in row) for row in mat.detach().cpu().tolist()),
        )

    @property
    def num_classes(self) -> int:
        return len(self.iou)

    def summary(self) -> str:
        """One line for logs: ``mIoU 72.31 | pixAcc 95.10 | mAcc 80.22 | fwIoU 91.04``."""
        return (f"mIoU {_pct(self.miou)} | pixAcc {_pct(self.pixel_acc)} | mAcc {_pct(self.mean_acc)} | "
                f"fwIoU {_pct(self.fwiou)}")

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready: fractions, ``None`` for n/a (JSON has no NaN)."""
        names = _names(class_names, self.num_classes)
        return {
            "miou": _num(self.miou),
            "pixel_acc": _num(self.pixel_acc),
            "mean_acc": _num(self.mean_acc),
            "fwiou": _num(self.fwiou),
            "miou_all_classes": _num(self.miou_all_classes),
            "num_pixels": self.num_pixels,
            "classes": [
                {"id": i, "name": n, "iou": _num(u), "acc": _num(a)}
                for i, (n, u, a) in enumerate(zip(names, self.iou, self.acc))
            ],
            "confusion": [list(r) for r in self.confusion],
            "conventions": "fractions in [0,1]; null = class absent from ground truth and prediction (IoU) or from "
                           "ground truth (acc), excluded from the means; miou_all_classes counts absent classes as 0",
        }

    def _rows(self, class_names: Sequence[str] | None) -> list[tuple[str, str, str]]:
        names = _names(class_names, self.num_classes)
        return [(n, _pct(u), _pct(a)) for n, u, a in zip(names, self.iou, self.acc)]

    def _totals(self) -> list[tuple[str, str]]:
        out = [("mIoU", _pct(self.miou)), ("pixel acc", _pct(self.pixel_acc)), ("mean acc", _pct(self.mean_acc)),
               ("fwIoU", _pct(self.fwiou))]
        if not math.isclose(self.miou, self.miou_all_classes, abs_tol=1e-12) and not math.isnan(self.miou):
            out.append(("mIoU, absent = 0", _pct(self.miou_all_classes)))
        return out

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """Plain-text table in percent; "n/a" marks classes excluded from the means."""
        rows = self._rows(class_names)
        w = max([len("class")] + [len(r[0]) for r in rows] + [len(k) for k, _ in self._totals()])
        line = "-" * (w + 18)
        out = [f"{'class':<{w}}  {'IoU %':>7}  {'acc %':>7}", line]
        out += [f"{n:<{w}}  {u:>7}  {a:>7}" for n, u, a in rows]
        out.append(line)
        out += [f"{k:<{w}}  {v:>7}" for k, v in self._totals()]
        return "\n".join(out)

    def markdown(self, class_names: Sequence[str] | None = None) -> str:
        out = ["| class | IoU % | acc % |", "|---|---:|---:|"]
        out += [f"| {n} | {u} | {a} |" for n, u, a in self._rows(class_names)]
        out += [f"| **{k}** | **{v}** | |" for k, v in self._totals()]
        out.append("")
        out.append(f"{self.num_pixels:,} labelled pixels scored; n/a = class absent from ground truth and prediction "
                   "(IoU) or from ground truth (acc), left out of the means.")
        return "\n".join(out) + "\n"

    def csv(self, class_names: Sequence[str] | None = None) -> str:
        """One row per class plus summary rows (name, iou, acc as fractions; empty cell for n/a)."""
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        wr.writerow(["id", "class", "iou", "acc"])
        for i, (n, u, a) in enumerate(zip(_names(class_names, self.num_classes), self.iou, self.acc)):
            wr.writerow([i, n, _cell(u), _cell(a)])
        for key in ("miou", "pixel_acc", "mean_acc", "fwiou", "miou_all_classes"):
            wr.writerow(["", key, _cell(getattr(self, key)), ""])
        return buf.getvalue()

    def save(
        self, out_dir: str | Path, stem: str = "metrics", class_names: Sequence[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.md`` into ``out_dir``; ``extra`` (e.g. the checkpoint,
        split and inference mode) goes into the JSON under ``"run"``. Returns the paths by format."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        data = self.to_dict(class_names)
        if extra:
            data = {"run": extra, **data}
        paths = {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}.csv", "md": out_dir / f"{stem}.md"}
        from ..engine.records import dumps  # here: the engine imports this module

        paths["json"].write_text(dumps(data, indent=2) + "\n")
        paths["csv"].write_text(self.csv(class_names))
        paths["md"].write_text(self.markdown(class_names))
        return paths


def _names(class_names: Sequence[str] | None, k: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(k)]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} classes")
    return [str(n) for n in class_names]


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.2f}"


def _num(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _cell(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.6f}"


__all__ = ["ConfusionMatrix", "SegMetrics"]
