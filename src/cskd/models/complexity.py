"""Parameter and FLOP counts. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts a
multiply-add as 2 FLOPs and covers matrix products and convolutions (not element-wise ops or pooling)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .segmentor import Segmentor


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_flops(module: nn.Module, input_shape: tuple[int, ...], **forward_kwargs: object) -> int:
    """Forward FLOPs for one input of ``input_shape`` (e.g. ``(1, 3, 512, 1024)``), counted on the meta device
    so that even the teacher at full resolution costs no memory or time."""
    was_training = module.training
    module.eval()
    try:
        with torch.device("meta"):
            x = torch.empty(input_shape)
        meta = _to_meta(module)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            meta(x, **forward_kwargs)
        return int(counter.get_total_flops())
    finally:
        module.train(was_training)


def _to_meta(module: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(module) if not any(p.is_meta for p in module.parameters()) else module
    return clone.to("meta")


@dataclass(frozen=True)
class ModelInfo:
    model: str
    backbone: str
    num_classes: int
    input_size: tuple[int, int]
    params: int
    params_without_aux: int
    gflops: float
    """Forward GFLOPs at ``input_size`` (batch 1), inference path (no auxiliary head)."""
    gflops_aux: float
    """The auxiliary head's extra forward GFLOPs when it runs (training)."""
    output_stride: int
    feature_channels: int
    logits_size: tuple[int, int]


def model_info(model: Segmentor, input_size: tuple[int, int]) -> ModelInfo:
    assert model.spec is not None, "model_info needs a model from build_segmentor"
    h, w = input_size
    shape = (1, 3, h, w)
    flops = count_flops(model, shape, with_aux=False)
    flops_aux = count_flops(model, shape, with_aux=True) - flops if model.aux_head is not None else 0
    aux_params = count_parameters(model.aux_head) if model.aux_head is not None else 0
    total = count_parameters(model)
    os_ = model.output_stride
    return ModelInfo(
        model=model.spec.model,
        backbone=model.spec.backbone,
        num_classes=model.num_classes,
        input_size=(h, w),
        params=total,
        params_without_aux=total - aux_params,
        gflops=flops / 1e9,
        gflops_aux=flops_aux / 1e9,
        output_stride=os_,
        feature_channels=model.feature_channels,
        logits_size=(-(-h // os_), -(-w // os_)),
    )


__all__ = ["ModelInfo", "count_flops", "count_parameters", "model_info"]
