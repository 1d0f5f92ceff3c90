"""What each dataset is, without touching the disk: classes, colours, and how its label files map to train ids.

Colour palettes (used for prediction maps):

- Cityscapes: the official colours of the 19 train classes (cityscapesScripts ``labels.py``).
- Synthscapes: the official Cityscapes colours of the classes the generator draws.
- CamVid: the colours of the SegNet CamVid release (its ``camvid.py`` colour code).
- Pascal VOC: the standard VOC palette (bit-interleaved colour of the class index; background black).
- ADE20K: the scene-parsing benchmark ships no colour table; cskd gives class ``k`` the VOC-rule colour of index
  ``k + 1``, which is distinct for all 150 classes and never black.
- COCO-Stuff-164K: likewise (171 classes).

Label tables are 256-entry look-ups indexed by the stored label value: ``to_train[v]`` is the train id (or the
ignore value 255) and ``valid[v]`` says whether ``v`` is a value the dataset defines at all. Anything else in a label
file is an error (a label from another dataset, a colour visualisation saved by mistake, a corrupt file).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..constants import IGNORE_INDEX
from . import cityscapes_labels as cs
from ._street import DRAWN_IDS

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's classes as the model and the metrics see them (train ids ``0 … num_classes − 1``)."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[Colour, ...]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
            raise ValueError(f"{self.name}: {self.num_classes} classes but {len(self.class_names)} names and "
                             f"{len(self.palette)} colours")

    def to_dict(self) -> dict:
        """The checkpoint's ``"dataset"`` entry."""
        return {"name": self.name, "num_classes": self.num_classes, "class_names": list(self.class_names),
                "palette": [list(c) for c in self.palette]}


@dataclass(frozen=True)
class LabelTable:
    """Stored label value → train id, and which stored values exist."""

    to_train: np.ndarray = field(repr=False)  # (256,) uint8
    valid: np.ndarray = field(repr=False)  # (256,) bool

    @property
    def valid_values(self) -> str:
        """The defined values, compactly, for error messages (e.g. ``0–33`` or ``0–20, 255``)."""
        vals = np.nonzero(self.valid)[0].tolist()
        runs: list[str] = []
        start = prev = vals[0]
        for v in vals[1:] + [None]:
            if v is not None and v == prev + 1:
                prev = v
                continue
            runs.append(f"{start}–{prev}" if prev > start else f"{start}")
            if v is not None:
                start = prev = v
        return ", ".join(runs)


def voc_colour(index: int) -> Colour:
    """The Pascal VOC colour rule: the bits of ``index`` spread over the high bits of R, G and B."""
    r = g = b = 0
    c = index
    for shift in range(7, -1, -1):
        r |= (c & 1) << shift
        g |= ((c >> 1) & 1) << shift
        b |= ((c >> 2) & 1) << shift
        c >>= 3
    return (r, g, b)


def _identity_table(n: int, ignored: tuple[int, ...] = ()) -> LabelTable:
    """Values 0 … n−1 are train ids; ``ignored`` values are defined but map to ignore."""
    to_train = np.full(256, IGNORE_INDEX, np.uint8)
    to_train[:n] = np.arange(n, dtype=np.uint8)
    valid = np.zeros(256, bool)
    valid[:n] = True
    for v in ignored:
        to_train[v] = IGNORE_INDEX
        valid[v] = True
    return LabelTable(to_train, valid)


# --------------------------------------------------------------------------- Cityscapes
CITYSCAPES = DatasetInfo("cityscapes", len(cs.CLASS_NAMES), cs.CLASS_NAMES, cs.PALETTE)
_cs_valid = np.zeros(256, bool)
_cs_valid[[lb.id for lb in cs.LABELS]] = True
CITYSCAPES_TABLE = LabelTable(cs.ID_TO_TRAIN_ID.copy(), _cs_valid)

# --------------------------------------------------------------------------- Synthscapes (generated, Cityscapes ids)
_synth_labels = [next(lb for lb in cs.LABELS if lb.id == i) for i in sorted(DRAWN_IDS)]
SYNTHSCAPES = DatasetInfo("synthscapes", len(_synth_labels), tuple(lb.name for lb in _synth_labels),
                          tuple(lb.color for lb in _synth_labels))
_synth_to_train = np.full(256, IGNORE_INDEX, np.uint8)
for _k, _lb in enumerate(_synth_labels):
    _synth_to_train[_lb.id] = _k
# Every Cityscapes id is a legal value (the generator writes "ego vehicle", id 1, which trains as ignore).
SYNTHSCAPES_TABLE = LabelTable(_synth_to_train, _cs_valid.copy())

# --------------------------------------------------------------------------- CamVid (SegNet release, 11 classes)
_CAMVID = (
    ("sky", (128, 128, 128)), ("building", (128, 0, 0)), ("pole", (192, 192, 128)), ("road", (128, 64, 128)),
    ("sidewalk", (60, 40, 222)), ("tree", (128, 128, 0)), ("sign symbol", (192, 128, 128)),
    ("fence", (64, 64, 128)), ("car", (64, 0, 128)), ("pedestrian", (64, 64, 0)), ("bicyclist", (0, 128, 192)),
)
CAMVID = DatasetInfo("camvid", 11, tuple(n for n, _ in _CAMVID), tuple(c for _, c in _CAMVID))
CAMVID_TABLE = _identity_table(11, ignored=(11,))  # 11 = void

# --------------------------------------------------------------------------- Pascal VOC 2012 (+ SBD)
_VOC_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
              "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
              "tv/monitor")
VOC = DatasetInfo("voc", 21, _VOC_NAMES, tuple(voc_colour(i) for i in range(21)))
VOC_TABLE = _identity_table(21, ignored=(255,))  # 255 = object borders / difficult

# --------------------------------------------------------------------------- ADE20K (SceneParsing, 150 classes)
_ADE_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
ADE20K = DatasetInfo("ade20k", 150, _ADE_NAMES, tuple(voc_colour(i + 1) for i in range(150)))
_ade_to_train = np.full(256, IGNORE_INDEX, np.uint8)
_ade_to_train[1:151] = np.arange(150, dtype=np.uint8)  # stored 1…150 → 0…149; 0 ("other") → ignore
_ade_valid = np.zeros(256, bool)
_ade_valid[:151] = True
ADE20K_TABLE = LabelTable(_ade_to_train, _ade_valid)

# --------------------------------------------------------------------------- COCO-Stuff-164K (171 classes)
# The 80 COCO thing classes (category ids 1-90, 10 of them unused) then the 91 stuff classes (ids 92-182), in id
# order: train id k is the k-th used id. The released stuffthingmaps store id − 1 (0-181; 255 unlabeled), which
# leaves 11 values unused (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 and 91): 182 − 11 = 171 classes.
_COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
_COCO_STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other",
    "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)
#: Stored values (category id − 1) of the stuffthingmaps that no class uses.
COCOSTUFF_UNUSED_VALUES = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCOSTUFF = DatasetInfo("cocostuff", 171, _COCO_THINGS + _COCO_STUFF, tuple(voc_colour(i + 1) for i in range(171)))
COCOSTUFF_TABLE = _identity_table(171, ignored=(255,))  # *_labelTrainIds.png: 0-170, 255 = unlabeled
_coco_raw_to_train = np.full(256, IGNORE_INDEX, np.uint8)
_coco_used = [v for v in range(182) if v not in COCOSTUFF_UNUSED_VALUES]
_coco_raw_to_train[_coco_used] = np.arange(171, dtype=np.uint8)
_coco_raw_valid = np.zeros(256, bool)
_coco_raw_valid[_coco_used + [255]] = True
COCOSTUFF_RAW_TABLE = LabelTable(_coco_raw_to_train, _coco_raw_valid)  # stuffthingmaps: 0-181 (171 used), 255

INFOS: dict[str, DatasetInfo] = {i.name: i for i in (CITYSCAPES, CAMVID, VOC, ADE20K, SYNTHSCAPES, COCOSTUFF)}


__all__ = ["ADE20K", "CAMVID", "CITYSCAPES", "COCOSTUFF", "COCOSTUFF_RAW_TABLE", "COCOSTUFF_TABLE",
           "COCOSTUFF_UNUSED_VALUES", "Colour", "DatasetInfo", "INFOS", "LabelTable", "SYNTHSCAPES", "VOC",
           "voc_colour"]
