"""The official Cityscapes label table (cityscapesScripts ``labels.py``): label id, train id, colour.

Training uses the 19 train ids; every other label id maps to the ignore value. Submissions to the test server go
back to label ids (:data:`TRAIN_ID_TO_ID`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..constants import IGNORE_INDEX


class Label(NamedTuple):
    name: str
    id: int
    train_id: int  # 255: not evaluated
    color: tuple[int, int, int]


LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, 255, (0, 0, 0)),
    Label("ego vehicle", 1, 255, (0, 0, 0)),
    Label("rectification border", 2, 255, (0, 0, 0)),
    Label("out of roi", 3, 255, (0, 0, 0)),
    Label("static", 4, 255, (0, 0, 0)),
    Label("dynamic", 5, 255, (111, 74, 0)),
    Label("ground", 6, 255, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, 255, (250, 170, 160)),
    Label("rail track", 10, 255, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, 255, (180, 165, 180)),
    Label("bridge", 15, 255, (150, 100, 100)),
    Label("tunnel", 16, 255, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, 255, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, 255, (0, 0, 90)),
    Label("trailer", 30, 255, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
)

TRAIN_LABELS: tuple[Label, ...] = tuple(sorted((lb for lb in LABELS if lb.train_id != 255), key=lambda lb: lb.train_id))
CLASS_NAMES: tuple[str, ...] = tuple(lb.name for lb in TRAIN_LABELS)
PALETTE: tuple[tuple[int, int, int], ...] = tuple(lb.color for lb in TRAIN_LABELS)

#: Lookup table label id (0..255) → train id; unknown ids → ignore. Index it with a uint8 label image.
ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _lb in LABELS:
    ID_TO_TRAIN_ID[_lb.id] = _lb.train_id

#: Lookup table train id (0..255) → label id for test-server files; ignore → 0 (unlabeled).
TRAIN_ID_TO_ID = np.zeros(256, dtype=np.uint8)
for _lb in TRAIN_LABELS:
    TRAIN_ID_TO_ID[_lb.train_id] = _lb.id

__all__ = ["CLASS_NAMES", "ID_TO_TRAIN_ID", "LABELS", "Label", "PALETTE", "TRAIN_ID_TO_ID", "TRAIN_LABELS"]
