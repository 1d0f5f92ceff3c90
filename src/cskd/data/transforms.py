"""Joint image/label transforms on the sample dict (``image``: tv_tensors.Image, ``mask``: tv_tensors.Mask).

Images stay **uint8** all the way through the data loader: 4× fewer bytes to augment, collate, pin and copy than
float32. ImageNet mean/std normalisation happens on the device, in float, with :func:`cskd.data.normalize.normalize`
(the engine, the evaluator and the exporters call it on each batch). Accordingly the padding colour of the image is
:func:`cskd.data.normalize.mean_pixel`, the uint8 colour that normalises to ≈ 0, as padding a normalised image
with 0 would; the label is padded with the ignore value, so padding never enters the loss or the metric.

Training (:func:`build_train_transform`): a random scale ``s`` in ``scale_range`` (uniform), a random crop of the
configured size out of the scaled image (padded where the scaled image is smaller), and a horizontal flip. The
crop window is chosen first and only its source region is resized (``resized_crop``), which is the same
augmentation as resize-then-crop at a fraction of the cost when ``s`` > 1. Images are resized bilinearly (with
antialiasing, which torchvision's uint8 kernel does at no extra cost); labels only ever with nearest neighbour.
Every training sample comes out at exactly ``crop_size``, so batches collate.

Evaluation (:func:`build_eval_transform`): the whole image, untouched (uint8); inference modes (whole, sliding
window, multi-scale) live in :mod:`cskd.evaluation`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..constants import IGNORE_INDEX
from .normalize import mean_pixel


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] from torch's generator (seeded per DataLoader worker)."""
    return low if high <= low else int(torch.randint(low, high + 1, ()).item())


class CropWindow(NamedTuple):
    """One draw of :class:`RandomScaleCrop`: the scale, the source region (top, left, src_h, src_w), the size it is
    resized to, and the padding (left, top, right, bottom) that brings that to ``crop_size``."""

    scale: float
    top: int
    left: int
    src_h: int
    src_w: int
    out_h: int
    out_w: int
    padding: tuple[int, int, int, int]


class RandomScaleCrop:
    """Random scale in ``scale_range``, then a random ``crop_size`` window, padding where the scaled image is
    smaller (image with ``fill``, label with the ignore value). Works on a sample dict; keys other than ``image``
    and ``mask`` pass through."""

    def __init__(self, crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                 fill: tuple[int, int, int] | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        ch, cw = (int(v) for v in crop_size)
        lo, hi = (float(v) for v in scale_range)
        if ch <= 0 or cw <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.crop_size = (ch, cw)
        self.scale_range = (lo, hi)
        self.fill = list(mean_pixel() if fill is None else fill)
        self.ignore_index = ignore_index

    def __repr__(self) -> str:
        return f"RandomScaleCrop(crop_size={self.crop_size}, scale_range={self.scale_range})"

    @staticmethod
    def _axis(src: int, crop: int, scale: float) -> tuple[int, int, int, int, int]:
        """For one axis: (source offset, source length, resized length, pad before, pad after). Where the scaled
        image covers the crop, the window is drawn in source pixels (``round(crop / scale)`` of them, resized to
        ``crop``): the same uniform placement as an offset drawn in the scaled image, without resizing the rest."""
        scaled = max(1, round(src * scale))
        if scaled >= crop:
            length = min(src, max(1, round(crop / scale)))
            return _randint(0, src - length), length, crop, 0, 0
        before = _randint(0, crop - scaled)
        return 0, src, scaled, before, crop - scaled - before

    def window(self, h: int, w: int) -> CropWindow:
        """Draw the scale and the window for an ``h``×``w`` source (the RNG calls of :meth:`__call__`)."""
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * float(torch.rand(()).item())
        top, src_h, out_h, pad_t, pad_b = self._axis(h, self.crop_size[0], scale)
        left, src_w, out_w, pad_l, pad_r = self._axis(w, self.crop_size[1], scale)
        return CropWindow(scale, top, left, src_h, src_w, out_h, out_w, (pad_l, pad_t, pad_r, pad_b))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        win = self.window(*image.shape[-2:])
        top, left, src_h, src_w, size = win.top, win.left, win.src_h, win.src_w, [win.out_h, win.out_w]
        padding = list(win.padding)
        out = dict(sample)
        img = F.resized_crop(tv_tensors.Image(image), top, left, src_h, src_w, size,
                             interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        if any(padding):
            img = F.pad(img, padding, fill=self.fill)
        out["image"] = img
        if "mask" in sample:
            mask = F.resized_crop(tv_tensors.Mask(sample["mask"]), top, left, src_h, src_w, size,
                                  interpolation=v2.InterpolationMode.NEAREST)
            if any(padding):
                mask = F.pad(mask, padding, fill=self.ignore_index)
            out["mask"] = mask
        return out


def build_train_transform(crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                          hflip: bool = True) -> v2.Compose:
    """Random scale, pad and crop to ``crop_size`` (H, W), horizontal flip; uint8 in, uint8 out."""
    steps: list[Any] = [RandomScaleCrop(crop_size, scale_range)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps)


def build_eval_transform() -> v2.Identity:
    """The whole image as decoded (uint8); see the module docstring."""
    return v2.Identity()


__all__ = ["CropWindow", "RandomScaleCrop", "build_eval_transform", "build_train_transform"]
