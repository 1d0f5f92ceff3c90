"""What a run writes besides checkpoints: a JSONL of scalars, optional TensorBoard events, a progress bar.

Only the main process writes. TensorBoard is optional (``pip install cskd[tensorboard]``); without it the JSONL
file is the record (the demo and comparison reports plot from it).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class RunRecorder:
    """The one writer of a run's ``log.jsonl`` (and of its TensorBoard events and progress bar).

    ``start`` is the iteration the run continues from: records a killed run wrote after it (past its last
    checkpoint) are dropped; a fresh run (``start`` 0) starts a new file."""

    def __init__(self, run_dir: Path, enabled: bool, total: int, start: int, progress: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if start:
            kept = [r for r in read_records(self.path) if r.get("iteration", 0) <= start]
            self.path.write_text("".join(json_line(r) for r in kept))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self._tb = None
        if progress:
            self._bar = tqdm(total=total, initial=start, desc=run_dir.name, unit="it", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def write(self, kind: str, iteration: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(kind, iteration, values)
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, iteration)

    def write_summary(self, iteration: int, values: dict[str, Any]) -> None:
        """The run's closing record, in ``log.jsonl`` only (may come after :meth:`close`)."""
        if self.enabled:
            self._append("summary", iteration, values)

    def _append(self, kind: str, iteration: int, values: dict[str, Any]) -> None:
        record = {"kind": kind, "iteration": iteration, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json_line(record))

    def advance(self, n: int, postfix: dict[str, Any] | None = None) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                      refresh=False)
            self._bar.update(n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    if hasattr(v, "tolist"):  # tensors and numpy values
        return _finite_or_none(v.tolist())
    return v


def dumps(obj: Any, indent: int | None = None) -> str:
    """Valid JSON (RFC 8259) for every file cskd writes (log.jsonl, metrics.json, results.json): NaN and ±inf,
    which ``json.dumps`` would write bare (or refuse), become null; tensors and NumPy values become lists / numbers,
    anything else its ``str``."""
    return json.dumps(_finite_or_none(obj), default=_jsonable, allow_nan=False, indent=indent)


def json_line(record: dict[str, Any]) -> str:
    """One line of valid JSON: :func:`dumps` of ``record`` and a newline."""
    return dumps(record) + "\n"


def read_records(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Read a run's ``log.jsonl`` (optionally one kind: "train", "val", "summary", ...)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill -9 mid-write
        if kind is None or rec.get("kind") == kind:
            out.append(rec)
    return out


__all__ = ["RunRecorder", "dumps", "json_line", "read_records"]
