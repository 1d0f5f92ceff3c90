"""Cityscapes test-server files: one single-channel PNG of *label ids* (the 34-id space) per test image.

What the server and its evaluator (``cityscapesscripts/evaluation/evalPixelLevelSemanticLabeling.py``) expect:
the PNG has the image's size and one channel; pixels hold label ids (``labels.py`` ``id``, not train ids); the
file is found by searching the results folder recursively for ``<city>_<sequence>_<frame>*.png``, and exactly
one file may match each image. We name files like the input image, ``<city>_<seq>_<frame>_leftImg8bit.png``
(as mmsegmentation does), all in one folder, to be zipped as is. Keep nothing else in that folder: a second PNG
with the same prefix (a palette map, say) makes the evaluator stop with "Found multiple predictions".
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..constants import IGNORE_INDEX
from ..data.cityscapes_labels import TRAIN_ID_TO_ID, TRAIN_LABELS
from ..errors import DataError

NUM_TRAIN_IDS = len(TRAIN_LABELS)
_KEY = re.compile(r"^([^_/\\]+)_(\d{6})_(\d{6})(?:_|\.|$)")


def cityscapes_key(name: str) -> str:
    """``berlin_000000_000019`` from a stem or file name such as ``berlin_000000_000019_leftImg8bit.png``."""
    m = _KEY.match(Path(name).name)
    if m is None:
        raise DataError(
            f"'{name}' is not a Cityscapes image name (<city>_<6-digit sequence>_<6-digit frame>…); the test "
            "server matches predictions to images by that prefix, so submissions need the original file names"
        )
    return "_".join(m.groups())


def submission_filename(name: str) -> str:
    return f"{cityscapes_key(name)}_leftImg8bit.png"


def train_ids_to_label_ids(pred: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 label ids for H×W train ids (0..18). The ignore value maps to 0 ("unlabeled"), which the evaluator
    scores as a miss wherever the ground truth is labelled; any other value is an error."""
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    arr = np.asarray(pred)
    if arr.ndim != 2:
        raise ValueError(f"expected an H×W map of train ids, got shape {arr.shape}")
    bad = (arr < 0) | ((arr >= NUM_TRAIN_IDS) & (arr != IGNORE_INDEX))
    if bad.any():
        raise DataError(
            f"train ids must lie in 0..{NUM_TRAIN_IDS - 1} (or {IGNORE_INDEX}); found {np.unique(arr[bad])[:10]}. "
            "Cityscapes submissions need a 19-class model."
        )
    return TRAIN_ID_TO_ID[arr.astype(np.uint8)]


def write_submission(pred_train_ids: np.ndarray | torch.Tensor, name: str, out_dir: str | Path) -> Path:
    """Write ``out_dir/<city>_<seq>_<frame>_leftImg8bit.png`` (mode "L", label ids) and return its path."""
    path = Path(out_dir) / submission_filename(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(train_ids_to_label_ids(pred_train_ids)).save(path)
    return path


__all__ = ["cityscapes_key", "submission_filename", "train_ids_to_label_ids", "write_submission"]
