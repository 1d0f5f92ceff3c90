"""Datasets on their standard layouts, joint uint8 transforms, and the built-in synthetic street scenes.

- :func:`build_dataset` / :data:`DATASETS` / :func:`dataset_info`: Cityscapes, CamVid, Pascal VOC (+SBD), ADE20K,
  COCO-Stuff-164K and the generated ``synthscapes`` (see :mod:`cskd.data.datasets` for the layouts and the
  bad-data policy).
- :func:`build_train_transform` / :func:`build_eval_transform`: uint8 in, uint8 out; normalisation happens on the
  device (:func:`cskd.data.normalize.normalize`).
- :mod:`cskd.data.synthetic`: ``generate`` / ``ensure`` the synthetic dataset; :mod:`cskd.data.check`: scan a split.
"""

from .check import CheckReport, check_split
from .datasets import (DATASETS, BadSampleWarning, DatasetDef, Sample, SegmentationDataset, build_dataset,
                       dataset_info)
from .info import DatasetInfo
from .normalize import mean_pixel, normalize
from .transforms import RandomScaleCrop, build_eval_transform, build_train_transform

__all__ = [
    "DATASETS", "BadSampleWarning", "CheckReport", "DatasetDef", "DatasetInfo", "RandomScaleCrop", "Sample",
    "SegmentationDataset", "build_dataset", "build_eval_transform", "build_train_transform", "check_split",
    "dataset_info", "mean_pixel", "normalize",
]
