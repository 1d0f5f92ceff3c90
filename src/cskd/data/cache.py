"""A folder of decoded samples (``data.cache``): each image and its train-id label stored once as raw uint8
``.npy`` arrays, then memory-mapped instead of decoded.

Decoding sets the loader's pace on full-size data: a 2048×1024 Cityscapes PNG and its label take ~37 of the
~49 ms a training sample costs on one core (docs/benchmarks.md). A memory-mapped array costs nothing to open, and
the crop-first augmentation then reads only the rows of its source window, so a cached sample's cost follows the
crop. The price is disk: 3×H×W + H×W bytes per sample (8 MiB for a Cityscapes image, ~24 GiB for its train split).

Entries fill lazily: the first load of a sample decodes it as usual (with every check of
:class:`~cskd.data.datasets.SegmentationDataset`) and writes it; DataLoader workers and data-parallel processes
may fill one folder at once (each file is written to a temporary name and renamed into place). An entry is keyed
by the image and label files' paths, sizes and modification times and by the dataset's label table, so an edited
file or another mapping never reads a stale entry. A damaged entry is decoded again and rewritten, with a
warning; a folder that cannot be written (full disk, read-only) warns once per process and the loader goes on
decoding.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .info import LabelTable

FORMAT = 1
"""Bumped whenever the stored arrays change meaning, so that older entries are never read."""


class CacheWarning(UserWarning):
    """The decoded-sample cache could not read or write an entry; loading went on without it."""


def _stat(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class DecodedCache:
    """Decoded samples of one dataset under ``root``: :meth:`get` returns the memory-mapped image (3×H×W) and
    label (H×W, train ids) of a sample, or None; :meth:`put` stores them."""

    def __init__(self, root: str | Path, dataset: str, table: LabelTable) -> None:
        self.root = Path(root).expanduser()
        self.dataset = dataset
        digest = hashlib.sha1(table.to_train.tobytes() + table.valid.tobytes()).hexdigest()[:12]
        self._salt = f"{FORMAT}|{dataset}|{digest}"
        self._unwritable = False  # per process: warn once, then stop trying

    def __repr__(self) -> str:
        return f"DecodedCache({str(self.root)!r}, dataset={self.dataset!r})"

    def paths(self, image_path: Path, label_path: Path | None) -> tuple[Path, Path]:
        """The entry's image and label files (raises OSError when a source file is missing)."""
        key = "|".join([self._salt, _stat(image_path), _stat(label_path) if label_path is not None else "-"])
        name = hashlib.sha1(key.encode()).hexdigest()
        folder = self.root / self.dataset / name[:2]
        return folder / f"{name}.image.npy", folder / f"{name}.label.npy"

    def get(self, image_path: Path, label_path: Path | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        try:
            image_file, label_file = self.paths(image_path, label_path)
        except OSError:
            return None  # the source is gone: let the decoder name the file
        if not image_file.is_file() or (label_path is not None and not label_file.is_file()):
            return None
        try:
            # "c" (copy-on-write): a writable view, so torch takes it without a copy or a warning, and nothing
            # written to it can reach the file.
            image = np.load(image_file, mmap_mode="c", allow_pickle=False)
            label = np.load(label_file, mmap_mode="c", allow_pickle=False) if label_path is not None else None
        except (OSError, ValueError, EOFError) as e:
            return self._damaged(image_file, image_path, str(e))
        if not (image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] == 3
                and (label is None or (label.dtype == np.uint8 and label.shape == image.shape[1:]))):
            return self._damaged(image_file, image_path, f"arrays of {image.dtype} {image.shape} and "
                                 f"{None if label is None else (label.dtype, label.shape)}")
        return torch.from_numpy(image), (torch.from_numpy(label) if label is not None else None)

    @staticmethod
    def _damaged(entry: Path, source: Path, reason: str) -> None:
        warnings.warn(f"{entry}: damaged cache entry of {source} ({reason}); decoding it again", CacheWarning,
                      stacklevel=3)
        return None

    def put(self, image_path: Path, label_path: Path | None, image: torch.Tensor, label: np.ndarray | None) -> None:
        if self._unwritable:
            return
        try:
            image_file, label_file = self.paths(image_path, label_path)
            # The label first: an entry counts as present once its image file exists.
            if label is not None:
                _save(label_file, np.ascontiguousarray(label, dtype=np.uint8))
            _save(image_file, image.numpy())
        except OSError as e:
            self._unwritable = True
            warnings.warn(f"{self.root}: cannot write the decoded-sample cache ({e.strerror or e}); this process "
                          "goes on decoding without it (free space there, or unset data.cache)",
                          CacheWarning, stacklevel=2)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["CacheWarning", "DecodedCache"]
