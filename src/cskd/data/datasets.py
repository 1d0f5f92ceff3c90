"""Datasets on their standard on-disk layouts, as users unpack them (nothing is downloaded).

Each dataset is a :class:`DatasetDef`: its classes (:class:`~cskd.data.info.DatasetInfo`), a label table, the
split names it has, and a function listing a split's (image, label, name) triples. :func:`build_dataset` turns one
into a :class:`SegmentationDataset`, which decodes, maps stored label values to train ids (255 = ignore) and hands
the sample dict to the transform.

Layouts (``ROOT`` is what the user passes):

==============  ===========================================================================================
cityscapes      ``ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``ROOT/gtFine/<split>/<city>/
                *_gtFine_labelIds.png``; splits train, val, test (no labels), trainval (= train + val).
synthscapes     the same layout, written by :mod:`cskd.data.synthetic`; splits train, val.
camvid          ``ROOT/{train,val,test}/*.png`` + ``ROOT/{train,val,test}annot/*.png`` (SegNet release);
                splits train, val, test, trainval.
voc             ``ROOT/JPEGImages/<id>.jpg`` + ``ROOT/SegmentationClassAug/<id>.png`` (else
                ``SegmentationClass/``); split lists ``<split>.txt`` in ``ROOT/ImageSets/Segmentation/``,
                ``ROOT/ImageSets/SegmentationAug/`` or ``ROOT``. Split ``train`` reads ``train_aug.txt`` (the
                10,582-image SBD list the papers train on); any other name ``X`` reads ``X.txt``, and a name
                ending in ``.txt`` is taken literally (``train.txt``: the plain 1,464-image list). ``test`` has
                no labels. ``ROOT`` may also be ``VOCdevkit/`` or its parent.
ade20k          ``ROOT/images/{training,validation}/*.jpg`` + ``ROOT/annotations/…/*.png``; splits train, val.
                ``ROOT`` may also be the folder holding ``ADEChallengeData2016/``.
cocostuff       COCO-Stuff-164K, 171 classes: ``ROOT/images/{train,val}2017/*.jpg`` +
                ``ROOT/annotations/{train,val}2017/<id>_labelTrainIds.png`` (train ids 0-170, 255 unlabeled, as
                the usual conversion script writes them); splits train, val. ``ROOT`` may also hold
                ``coco_stuff164k/``.
cocostuff_raw   the same images with the released ``stuffthingmaps_trainval2017`` labels,
                ``ROOT/annotations/{train,val}2017/<id>.png`` (category id − 1: 0-181, 255 unlabeled), mapped to
                the same 171 classes (the 11 unused ids are not legal values).
==============  ===========================================================================================

Bad data policy. Construction does a cheap scan (file listing and existence): an empty split, an unknown split or a
missing label file is a :class:`~cskd.errors.DataError` before any training starts. Problems only visible in the
bytes (a corrupt image, label values the dataset does not define, image/label size mismatch) raise DataError
naming the file when the sample is loaded. ``cskd data check`` (:func:`cskd.data.check.check_split`) finds all of
them up front. With ``skip_bad=True`` samples with missing labels are dropped at construction and unreadable
samples are replaced at load time by the next readable sample in index order (wrapping around), each with a
:class:`BadSampleWarning` carrying a running count; the replacement depends only on the index, so runs stay
reproducible.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..errors import DataError
from .cache import DecodedCache
from .info import (ADE20K, ADE20K_TABLE, CAMVID, CAMVID_TABLE, CITYSCAPES, CITYSCAPES_TABLE, COCOSTUFF,
                   COCOSTUFF_RAW_TABLE, COCOSTUFF_TABLE, SYNTHSCAPES, SYNTHSCAPES_TABLE, VOC, VOC_TABLE, Colour,
                   DatasetInfo, LabelTable)
from .io import map_label, read_encoded_image, read_image, read_label


class Sample(NamedTuple):
    image_path: Path
    label_path: Path | None  # None: the split has no labels
    name: str  # file stem without the dataset's suffix (enough to write the test-server file names back)


class BadSampleWarning(UserWarning):
    """A sample was skipped (``skip_bad=True``); the message names the file and counts the skips so far."""


Lister = Callable[[Path, str], list[Sample]]


@dataclass(frozen=True)
class DatasetDef:
    info: DatasetInfo
    table: LabelTable
    splits: tuple[str, ...]
    unlabelled_splits: tuple[str, ...]
    layout: str  # one line, shown in errors
    lister: Lister
    open_splits: bool = False  # VOC: any split with a list file is accepted

    def check_split(self, split: str) -> None:
        if split not in self.splits and not self.open_splits:
            raise DataError(f"{self.info.name} has no split {split!r}; splits: {', '.join(self.splits)}")


def _sorted_files(folder: Path, suffix: str) -> list[Path]:
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_file() and e.name.endswith(suffix))


def _sorted_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_dir())


def _empty(name: str, where: str, layout: str) -> DataError:
    return DataError(f"{name}: no images found in {where}; expected {layout}")


# --------------------------------------------------------------------------- Cityscapes layout (also synthscapes)
_CS_IMG, _CS_LAB = "_leftImg8bit.png", "_gtFine_labelIds.png"


def _cityscapes_list(root: Path, split: str, *, dataset: str, unlabelled: tuple[str, ...], layout: str) -> list[Sample]:
    if split == "trainval":
        return (_cityscapes_list(root, "train", dataset=dataset, unlabelled=unlabelled, layout=layout)
                + _cityscapes_list(root, "val", dataset=dataset, unlabelled=unlabelled, layout=layout))
    img_dir = root / "leftImg8bit" / split
    out = []
    for city in _sorted_dirs(img_dir):
        for img in _sorted_files(city, _CS_IMG):
            stem = img.name[: -len(_CS_IMG)]
            lab = None if split in unlabelled else root / "gtFine" / split / city.name / f"{stem}{_CS_LAB}"
            out.append(Sample(img, lab, stem))
    if not out:
        raise _empty(dataset, f"{img_dir}/<city>/*{_CS_IMG}", layout)
    return out


# --------------------------------------------------------------------------- CamVid (SegNet release)
_CAMVID_LAYOUT = "ROOT/{train,val,test}/*.png with labels in ROOT/{train,val,test}annot/ (SegNet CamVid)"


def _camvid_lister(root: Path, split: str) -> list[Sample]:
    if split == "trainval":
        return _camvid_lister(root, "train") + _camvid_lister(root, "val")
    out = [Sample(p, root / f"{split}annot" / p.name, p.stem) for p in _sorted_files(root / split, ".png")]
    if not out:
        raise _empty("camvid", f"{root / split}/*.png", _CAMVID_LAYOUT)
    return out


# --------------------------------------------------------------------------- Pascal VOC 2012 (+ SBD)
_VOC_LAYOUT = ("ROOT/JPEGImages/*.jpg, ROOT/SegmentationClassAug/*.png (or SegmentationClass/), split lists in "
               "ROOT/ImageSets/Segmentation/")


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    return root


def _voc_lister(root: Path, split: str) -> list[Sample]:
    root = _voc_root(root)
    filename = split if split.endswith(".txt") else f"{'train_aug' if split == 'train' else split}.txt"
    places = [root / "ImageSets" / "Segmentation", root / "ImageSets" / "SegmentationAug", root]
    lst = next((p / filename for p in places if (p / filename).is_file()), None)
    if lst is None:
        hint = (" (split 'train' is the 10,582-image SBD list train_aug.txt; use split 'train.txt' for the plain "
                "1,464-image VOC list)" if split == "train" else "")
        raise DataError(f"voc: split list {filename} not found in {', '.join(str(p) for p in places)}{hint}")
    try:
        ids = [ln.split()[0] for ln in lst.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{lst}: cannot read split list ({e})") from None
    if not ids:
        raise DataError(f"{lst}: split list is empty")
    labelled = split not in ("test", "test.txt")
    label_dirs = [root / "SegmentationClassAug", root / "SegmentationClass"]
    out = []
    for i in ids:
        i = Path(i).stem  # some lists hold "JPEGImages/2007_000032.jpg" paths
        lab = None
        if labelled:
            lab = next((d / f"{i}.png" for d in label_dirs if (d / f"{i}.png").is_file()), label_dirs[0] / f"{i}.png")
        out.append(Sample(root / "JPEGImages" / f"{i}.jpg", lab, i))
    return out


# --------------------------------------------------------------------------- ADE20K (SceneParsing)
_ADE_LAYOUT = "ROOT/images/{training,validation}/*.jpg with ROOT/annotations/{training,validation}/*.png"


def _ade_lister(root: Path, split: str) -> list[Sample]:
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016" / "images").is_dir():
        root = root / "ADEChallengeData2016"
    sub = {"train": "training", "val": "validation"}[split]
    out = [Sample(p, root / "annotations" / sub / f"{p.stem}.png", p.stem)
           for p in _sorted_files(root / "images" / sub, ".jpg")]
    if not out:
        raise _empty("ade20k", f"{root / 'images' / sub}/*.jpg", _ADE_LAYOUT)
    return out


# --------------------------------------------------------------------------- COCO-Stuff-164K
_COCO_LABEL = {"cocostuff": "_labelTrainIds.png", "cocostuff_raw": ".png"}


def _coco_layout(dataset: str) -> str:
    return f"ROOT/images/{{train,val}}2017/*.jpg with ROOT/annotations/{{train,val}}2017/<id>{_COCO_LABEL[dataset]}"


def _coco_lister(root: Path, split: str, *, dataset: str) -> list[Sample]:
    if not (root / "images").is_dir() and (root / "coco_stuff164k" / "images").is_dir():
        root = root / "coco_stuff164k"
    sub = f"{split}2017"
    labels = root / "annotations" / sub
    out = [Sample(p, labels / f"{p.stem}{_COCO_LABEL[dataset]}", p.stem)
           for p in _sorted_files(root / "images" / sub, ".jpg")]
    if not out:
        raise _empty(dataset, f"{root / 'images' / sub}/*.jpg", _coco_layout(dataset))
    first = out[0]
    if dataset == "cocostuff" and not first.label_path.is_file() and (labels / f"{first.name}.png").is_file():
        raise DataError(f"cocostuff: {labels} holds the released stuffthingmaps (<id>.png), not "
                        f"<id>_labelTrainIds.png; use dataset 'cocostuff_raw', which reads them as they are")
    return out


_CS_LAYOUT = "ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png with ROOT/gtFine/<split>/<city>/*_gtFine_labelIds.png"
_SYN_LAYOUT = _CS_LAYOUT + " (made by `cskd data synth`)"

DATASETS: dict[str, DatasetDef] = {
    "cityscapes": DatasetDef(CITYSCAPES, CITYSCAPES_TABLE, ("train", "val", "test", "trainval"), ("test",),
                             _CS_LAYOUT, partial(_cityscapes_list, dataset="cityscapes", unlabelled=("test",),
                                                 layout=_CS_LAYOUT)),
    "camvid": DatasetDef(CAMVID, CAMVID_TABLE, ("train", "val", "test", "trainval"), (), _CAMVID_LAYOUT,
                         _camvid_lister),
    "voc": DatasetDef(VOC, VOC_TABLE, ("train", "val", "trainval", "test"), ("test", "test.txt"), _VOC_LAYOUT,
                      _voc_lister, open_splits=True),
    "ade20k": DatasetDef(ADE20K, ADE20K_TABLE, ("train", "val"), (), _ADE_LAYOUT, _ade_lister),
    "cocostuff": DatasetDef(COCOSTUFF, COCOSTUFF_TABLE, ("train", "val"), (), _coco_layout("cocostuff"),
                            partial(_coco_lister, dataset="cocostuff")),
    "cocostuff_raw": DatasetDef(COCOSTUFF, COCOSTUFF_RAW_TABLE, ("train", "val"), (), _coco_layout("cocostuff_raw"),
                                partial(_coco_lister, dataset="cocostuff_raw")),
    "synthscapes": DatasetDef(SYNTHSCAPES, SYNTHSCAPES_TABLE, ("train", "val", "trainval"), (), _SYN_LAYOUT,
                              partial(_cityscapes_list, dataset="synthscapes", unlabelled=(), layout=_SYN_LAYOUT)),
}


def get_def(name: str) -> DatasetDef:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def dataset_info(name: str) -> DatasetInfo:
    """Classes, names and colours of a dataset; touches no file."""
    return get_def(name).info


def list_split(name: str, root: str | Path, split: str) -> list[Sample]:
    """The split's samples as listed on disk (no existence check of label files); DataError if there are none."""
    d = get_def(name)
    d.check_split(split)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{name}: dataset root {root} does not exist (expected {d.layout})")
    return d.lister(root, split)


class SegmentationDataset(Dataset):
    """Decoded samples as dicts: ``image`` (tv_tensors.Image, uint8 3×H×W), ``mask`` (tv_tensors.Mask, uint8
    H×W train ids, 255 = ignore; absent when the split has no labels), ``name`` (str) and ``index`` (int), passed
    through ``transform`` if one is given.

    With ``encoded_images`` (``data.decode: gpu``; see :meth:`with_encoded_images`) the image is not decoded: the
    sample holds ``image_encoded`` (the file's bytes), ``image_size`` ((H, W) from its header), ``image_nvjpeg``
    (whether nvJPEG can decode it) and ``image_path`` (str, for error messages) instead of ``image``; the label is
    decoded and checked as always."""

    def __init__(self, definition: DatasetDef, root: Path, split: str, samples: list[Sample],
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None, skip_bad: bool = False,
                 cache: DecodedCache | None = None, encoded_images: bool = False) -> None:
        if not samples:
            raise DataError(f"{definition.info.name}: split {split!r} under {root} has no usable samples")
        self.definition = definition
        self.root = root
        self.split = split
        self.samples = samples
        self.transform = transform
        self.skip_bad = skip_bad
        self.cache = cache
        self.encoded_images = encoded_images
        self.has_labels = samples[0].label_path is not None
        self._bad: set[int] = set()  # per process (each DataLoader worker keeps its own)

    def with_encoded_images(self) -> SegmentationDataset:
        """This dataset (the same samples, transform and bad-data policy) handing out images still encoded."""
        clone = copy.copy(self)
        clone.encoded_images = True
        clone._bad = set()
        return clone

    # The interface the engine and the metrics use.
    @property
    def info(self) -> DatasetInfo:
        return self.definition.info

    @property
    def table(self) -> LabelTable:
        return self.definition.table

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def palette(self) -> tuple[Colour, ...]:
        return self.info.palette

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.info.name!r}, split={self.split!r}, root={str(self.root)!r}, n={len(self)})"

    def load(self, index: int) -> dict[str, Any]:
        """Decode sample ``index`` (or map it from the cache) without a transform (with ``encoded_images``, the image
        is left encoded and the cache is not used); raises DataError naming the file on any defect found."""
        s = self.samples[index]
        if self.encoded_images:
            encoded = read_encoded_image(s.image_path)
            out: dict[str, Any] = {"image_encoded": encoded.data, "image_size": encoded.size,
                                   "image_nvjpeg": encoded.nvjpeg, "image_path": str(s.image_path)}
            if s.label_path is not None:
                out["mask"] = tv_tensors.Mask(self._read_mask(s, encoded.size))
            out["name"] = s.name
            out["index"] = index
            return out
        cached = self.cache.get(s.image_path, s.label_path) if self.cache is not None else None
        if cached is not None:
            image, mask = cached
        else:
            image = read_image(s.image_path)
            mask = None
            if s.label_path is not None:
                mask = self._read_mask(s, (int(image.shape[1]), int(image.shape[2])))
            if self.cache is not None:
                self.cache.put(s.image_path, s.label_path, image, None if mask is None else mask.numpy())
        out = {"image": tv_tensors.Image(image)}
        if mask is not None:
            out["mask"] = tv_tensors.Mask(mask)
        out["name"] = s.name
        out["index"] = index
        return out

    def _read_mask(self, s: Sample, size: tuple[int, int]) -> torch.Tensor:
        """The train-id label of ``s`` (H×W uint8), checked against its image's size (H, W)."""
        assert s.label_path is not None
        raw = read_label(s.label_path)
        if raw.shape != size:
            raise DataError(f"{s.label_path}: label is {raw.shape[0]}×{raw.shape[1]} but its image "
                            f"{s.image_path} is {size[0]}×{size[1]}")
        return torch.from_numpy(map_label(raw, self.table, s.label_path))

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                sample = self.load(i)
            except DataError as e:
                if not self.skip_bad:
                    raise
                self._bad.add(i)
                warnings.warn(f"skipping bad sample {i} ({len(self._bad)} skipped so far in this process): {e}",
                              BadSampleWarning, stacklevel=2)
                continue
            return self.transform(sample) if self.transform is not None else sample
        raise DataError(f"{self.info.name}: none of the {n} samples of split {self.split!r} under {self.root} "
                        "could be read")


def build_dataset(name: str, root: str | Path, split: str,
                  transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None, *,
                  skip_bad: bool = False, cache: str | Path | None = None) -> SegmentationDataset:
    """The ``split`` of dataset ``name`` under ``root``. Raises DataError now for an unknown name or split, a
    missing root, an empty split and (unless ``skip_bad``) missing label files. ``cache``: a folder for decoded
    samples (:mod:`cskd.data.cache`)."""
    d = get_def(name)
    root = Path(root).expanduser()
    samples = list_split(name, root, split)
    missing = [s for s in samples if s.label_path is not None and not s.label_path.is_file()]
    if missing:
        if not skip_bad:
            first = missing[0]
            raise DataError(f"{name}: {len(missing)} of {len(samples)} images in split {split!r} have no label file, "
                            f"e.g. {first.image_path} → expected {first.label_path} (layout: {d.layout}); pass "
                            "skip_bad to drop them")
        warnings.warn(f"{name}: dropping {len(missing)} of {len(samples)} images in split {split!r} without a label "
                      f"file (e.g. {missing[0].label_path})", BadSampleWarning, stacklevel=2)
        gone = {id(s) for s in missing}
        samples = [s for s in samples if id(s) not in gone]
    return SegmentationDataset(d, root, split, samples, transform, skip_bad,
                               DecodedCache(cache, name, d.table) if cache is not None else None)


__all__ = ["BadSampleWarning", "DATASETS", "DatasetDef", "Sample", "SegmentationDataset", "build_dataset",
           "dataset_info", "get_def", "list_split"]
