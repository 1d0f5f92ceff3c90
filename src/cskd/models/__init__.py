"""Segmentation models: backbones, heads and segmentors, checkpoint-compatible with the published CSKD code.

Reading and writing their weights is :mod:`cskd.checkpoints`."""

from .complexity import ModelInfo, count_flops, count_parameters, model_info
from .segmentor import MODELS, ModelSpec, SegOutput, Segmentor, build_from_spec, build_segmentor

__all__ = [
    "MODELS", "ModelInfo", "ModelSpec", "SegOutput", "Segmentor", "build_from_spec", "build_segmentor",
    "count_flops", "count_parameters", "model_info",
]
