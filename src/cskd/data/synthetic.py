"""Synthscapes: seeded synthetic street scenes with exact labels, written in the Cityscapes layout.

``generate(out_dir, n_train, n_val, size, seed)`` writes

- ``out_dir/leftImg8bit/{train,val}/<city>/<city>_<nnnnnn>_000019_leftImg8bit.png`` (RGB),
- ``out_dir/gtFine/{train,val}/<city>/<city>_<nnnnnn>_000019_gtFine_labelIds.png`` (official Cityscapes label ids),
- ``…_gtFine_instanceIds.png`` beside it (16-bit: ``id × 1000 + n`` for each person and car, the label id elsewhere),
  so that the official evaluator (``cityscapesscripts``) runs on the tree unchanged, instance scores included,
- ``out_dir/manifest.json``: the parameters, the classes and their pixel frequencies per split,

so the real Cityscapes loader reads it (dataset name ``synthscapes``: its own table maps the generated ids to 13
train ids; the rare "ego vehicle" bonnet is written with its Cityscapes id and trains as ignore). What is drawn and
why it is hard is described in :mod:`cskd.data._street`.

Each image is rendered from its own generator seeded by ``(seed, split, index)``, so the files are identical
whatever the number of worker processes (on a given numpy build and CPU). ``ensure`` regenerates when the manifest
is missing (an interrupted run) or its parameters differ, and never silently reuses data of another size, count,
seed or generator version; it only ever deletes a tree that it wrote itself.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__
from ..errors import DataError
from ._street import render_with_instances
from .info import SYNTHSCAPES, SYNTHSCAPES_TABLE

#: Bump whenever the renderer's output changes, so that ``ensure`` regenerates old trees.
#: 2: the tree also holds ``*_gtFine_instanceIds.png`` (images and labels as in version 1).
GENERATOR_VERSION = 2
MANIFEST = "manifest.json"
_MARKER = ".cskd-synthscapes"  # written first: marks a (possibly partial) tree as ours to delete
_SPLITS = {"train": 0, "val": 1}
_CITY_SIZE = 500  # images per city folder, as Cityscapes groups them
_FRAME = "000019"


def sample_stem(split: str, index: int) -> tuple[str, str]:
    """(city folder, file stem) of image ``index`` of ``split``."""
    city = f"synth{split}{index // _CITY_SIZE:02d}"
    return city, f"{city}_{index:06d}_{_FRAME}"


def render_sample(seed: int, split: str, index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(H×W×3 uint8 image, H×W uint8 Cityscapes label ids) of one sample: a pure function of its arguments."""
    img, lab, _ = render_sample_instances(seed, split, index, size)
    return img, lab


def render_sample_instances(seed: int, split: str, index: int,
                            size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As :func:`render_sample`, plus the H×W uint16 Cityscapes instance ids."""
    rng = np.random.default_rng([int(seed), _SPLITS[split], int(index)])
    return render_with_instances(rng, int(size[0]), int(size[1]))


def _write_one(task: tuple[str, int, str, int, tuple[int, int]]) -> tuple[str, np.ndarray]:
    out_dir, seed, split, index, size = task
    img, lab, inst = render_sample_instances(seed, split, index, size)
    city, stem = sample_stem(split, index)
    root = Path(out_dir)
    img_path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
    lab_path = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
    # Fast zlib level for the noisy photo (level 1 is ~4× faster than the default at ~the same size);
    # the label compresses well at any level.
    Image.fromarray(img).save(img_path, format="PNG", compress_level=1)
    Image.fromarray(lab).save(lab_path, format="PNG", compress_level=6)
    Image.fromarray(inst).save(lab_path.with_name(f"{stem}_gtFine_instanceIds.png"), format="PNG", compress_level=6)
    return split, np.bincount(lab.ravel(), minlength=256)


def _params(n_train: int, n_val: int, size: tuple[int, int], seed: int) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "size": [int(size[0]), int(size[1])],
            "splits": {"train": int(n_train), "val": int(n_val)}}


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a generated tree, or None when there is none (never generated, or interrupted)."""
    path = Path(out_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable synthscapes manifest ({e}); delete {path.parent} to regenerate") from None


def _frequencies(counts: np.ndarray) -> dict[str, Any]:
    total = int(counts.sum())
    train_ids = SYNTHSCAPES_TABLE.to_train
    per_class = np.zeros(SYNTHSCAPES.num_classes, np.int64)
    ignored = 0
    for value in np.nonzero(counts)[0]:
        t = int(train_ids[value])
        if t < SYNTHSCAPES.num_classes:
            per_class[t] += counts[value]
        else:
            ignored += int(counts[value])
    return {"pixels": total,
            "classes": {n: round(float(c) / max(total, 1), 6) for n, c in zip(SYNTHSCAPES.class_names, per_class)},
            "ignored": round(ignored / max(total, 1), 6)}


@contextlib.contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    """Serialise generation into one folder across processes (e.g. several ranks calling ``ensure``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, a single process is assumed
        yield
        return
    with open(out_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clear(out_dir: Path) -> None:
    """Remove a previous tree; only one this module wrote (its marker file is there)."""
    ours = (out_dir / _MARKER).exists()
    existing = [out_dir / d for d in ("leftImg8bit", "gtFine") if (out_dir / d).exists()]
    if existing and not ours:
        raise DataError(f"{out_dir} already holds {existing[0].name}/ not written by `cskd data synth`; refusing to "
                        "overwrite it (choose another output folder)")
    for d in existing:
        shutil.rmtree(d)
    (out_dir / MANIFEST).unlink(missing_ok=True)


def _pool_context() -> mp.context.BaseContext:
    # fork: workers start instantly and need nothing re-imported; they only run numpy and Pillow.
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")


def _check_args(n_train: int, n_val: int, size: tuple[int, int], seed: int) -> tuple[int, int]:
    if n_train < 0 or n_val < 0 or n_train + n_val == 0:
        raise DataError(f"synthscapes: need at least one image (train={n_train}, val={n_val})")
    h, w = (int(v) for v in size)
    if h < 16 or w < 16:
        raise DataError(f"synthscapes: size {h}×{w} is too small (at least 16×16)")
    if seed < 0:
        raise DataError(f"synthscapes: seed must be >= 0, got {seed}")
    return h, w


def generate(out_dir: str | Path, n_train: int, n_val: int, size: tuple[int, int] = (256, 512), seed: int = 0,
             workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Render ``n_train`` + ``n_val`` scenes of ``size`` (H, W) into ``out_dir`` (replacing a previous synthscapes
    tree there) with ``workers`` processes (default: all CPUs); returns the manifest. ``progress(done, total)``
    is called as images are written."""
    hw = _check_args(n_train, n_val, size, seed)
    out = Path(out_dir).expanduser()
    with _lock(out):
        return _generate_locked(out, n_train, n_val, hw, seed, workers, progress)


def _generate_locked(out: Path, n_train: int, n_val: int, size: tuple[int, int], seed: int, workers: int | None,
                     progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    _clear(out)
    (out / _MARKER).write_text("written by cskd.data.synthetic; safe to delete with this folder\n")
    tasks = []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            city, _ = sample_stem(split, i)
            if i % _CITY_SIZE == 0:
                (out / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
                (out / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            tasks.append((str(out), int(seed), split, i, size))
    counts = {"train": np.zeros(256, np.int64), "val": np.zeros(256, np.int64)}
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    start = time.perf_counter()
    pool = _pool_context().Pool(n_workers) if n_workers > 1 else None
    try:
        results: Iterator[tuple[str, np.ndarray]] = (
            map(_write_one, tasks) if pool is None
            else pool.imap_unordered(_write_one, tasks, chunksize=max(1, min(16, len(tasks) // (8 * n_workers)))))
        for done, (split, c) in enumerate(results, 1):
            counts[split] += c
            if progress is not None:
                progress(done, len(tasks))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    manifest = {
        "generator": "cskd synthscapes",
        **_params(n_train, n_val, size, seed),
        "cskd_version": __version__,
        "layout": "cityscapes",
        "classes": [{"train_id": k, "name": n, "label_id": int(np.nonzero(SYNTHSCAPES_TABLE.to_train == k)[0][0]),
                     "color": list(c)} for k, (n, c) in enumerate(zip(SYNTHSCAPES.class_names, SYNTHSCAPES.palette))],
        "class_frequencies": {s: _frequencies(c) for s, c in counts.items() if c.sum()},
        "workers": n_workers,
        "seconds": round(time.perf_counter() - start, 2),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)  # last, atomically: a tree without a manifest is unfinished
    return manifest


def matches(manifest: dict[str, Any] | None, n_train: int, n_val: int, size: tuple[int, int], seed: int) -> bool:
    """Whether a manifest describes exactly these parameters (and the current generator)."""
    if manifest is None:
        return False
    want = _params(n_train, n_val, size, seed)
    return all(manifest.get(k) == v for k, v in want.items())


def ensure(out_dir: str | Path, n_train: int, n_val: int, size: tuple[int, int] = (256, 512), seed: int = 0,
           workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """``out_dir``, generated first unless it already holds exactly these parameters."""
    hw = _check_args(n_train, n_val, size, seed)
    out = Path(out_dir).expanduser()
    if matches(read_manifest(out), n_train, n_val, hw, seed):
        return out
    with _lock(out):  # another process may have finished it while this one waited
        if not matches(read_manifest(out), n_train, n_val, hw, seed):
            _generate_locked(out, n_train, n_val, hw, seed, workers, progress)
    return out


def format_frequencies(manifest: dict[str, Any]) -> str:
    """A table of class pixel frequencies per split (what ``cskd data synth`` prints)."""
    freqs = manifest["class_frequencies"]
    splits = list(freqs)
    names = list(SYNTHSCAPES.class_names) + ["(ignored)"]
    width = max(len(n) for n in names)
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in splits)]
    for n in names:
        vals = [freqs[s]["ignored"] if n == "(ignored)" else freqs[s]["classes"][n] for s in splits]
        lines.append(f"{n:<{width}}  " + "  ".join(f"{100 * v:6.2f}%" for v in vals))
    return "\n".join(lines)


__all__ = ["GENERATOR_VERSION", "MANIFEST", "ensure", "format_frequencies", "generate", "matches", "read_manifest",
           "render_sample", "sample_stem"]
