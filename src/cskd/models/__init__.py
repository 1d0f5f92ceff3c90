"""Segmentation models: backbones, heads and segmentors, checkpoint-compatible with the published CSKD code."""

from .checkpoint import check_fit, extract_state_dict, load_backbone_weights, load_weights, safe_load
from .complexity import ModelInfo, count_flops, count_parameters, model_info
from .convert import backbone_state_dict, from_official, is_official_layout, official_model_name, to_official
from .segmentor import MODELS, ModelSpec, SegOutput, Segmentor, build_from_spec, build_segmentor

__all__ = [
    "MODELS", "ModelInfo", "ModelSpec", "SegOutput", "Segmentor", "backbone_state_dict", "build_from_spec",
    "build_segmentor", "check_fit", "count_flops", "count_parameters", "extract_state_dict", "from_official",
    "is_official_layout", "load_backbone_weights", "load_weights", "model_info", "official_model_name",
    "safe_load", "to_official",
]
