"""Normalisation happens on the device, after the uint8 batch has crossed the bus.

The data loader hands out uint8 images (4× fewer bytes to decode, augment, pin and copy than float32); the engine,
the evaluator and the exporters turn them into ImageNet-normalised float32 here, where it costs one fused pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..constants import IMAGENET_MEAN, IMAGENET_STD


def normalize(
    images: Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """uint8 (B×)3×H×W in [0, 255] → float32 ``(x / 255 − mean) / std``; float input is taken as already in [0, 1]."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s


def mean_pixel(mean: tuple[float, float, float] = IMAGENET_MEAN) -> tuple[int, int, int]:
    """The uint8 colour that normalises to ~0: what padded image borders are filled with."""
    return tuple(round(255 * m) for m in mean)  # type: ignore[return-value]


__all__ = ["mean_pixel", "normalize"]
