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

Deferred images (``data.decode: gpu``, :class:`EncodedTrainTransform`): the loader worker holds the JPEG's bytes
and its header's size only. The transform draws the same scale, window and flip with the same RNG calls in the
same order as the training transform, crops and flips the label as it does, and writes the draw into the sample
(``image_plan``, see :func:`plan_row`); :func:`cskd.data.gpu_decode.decode_batch` decodes the batch on the device
and applies the same :func:`resize_window`, padding and flip to each image. For a given ``(seed, epoch, index)``
both paths therefore use the identical window and flip, and the labels are identical.
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

    def crop_mask(self, mask: torch.Tensor, win: CropWindow) -> tv_tensors.Mask:
        """The label under window ``win``: nearest-neighbour resize of its source region, padded with ignore."""
        out = F.resized_crop(tv_tensors.Mask(mask), win.top, win.left, win.src_h, win.src_w, [win.out_h, win.out_w],
                             interpolation=v2.InterpolationMode.NEAREST)
        if any(win.padding):
            out = F.pad(out, list(win.padding), fill=self.ignore_index)
        return out

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        win = self.window(*image.shape[-2:])
        out = dict(sample)
        img = resize_window(image, win)
        if any(win.padding):
            img = F.pad(img, list(win.padding), fill=self.fill)
        out["image"] = img
        if "mask" in sample:
            out["mask"] = self.crop_mask(sample["mask"], win)
        return out


def resize_window(image: torch.Tensor, win: CropWindow) -> tv_tensors.Image:
    """The source region of ``win`` resized to its output size (bilinear, antialiased), unpadded; on any device."""
    return F.resized_crop(tv_tensors.Image(image), win.top, win.left, win.src_h, win.src_w, [win.out_h, win.out_w],
                          interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


PLAN_FIELDS = ("height", "width", "top", "left", "src_h", "src_w", "out_h", "out_w", "pad_left", "pad_top",
               "pad_right", "pad_bottom", "flip")
"""The columns of an ``image_plan`` row: the source size from the header, the window, the flip (0/1)."""


def plan_row(size: tuple[int, int], win: CropWindow, flip: bool) -> torch.Tensor:
    """One sample's augmentation draw as an int64 vector (``PLAN_FIELDS``), which batches collate by stacking."""
    return torch.tensor([size[0], size[1], win.top, win.left, win.src_h, win.src_w, win.out_h, win.out_w,
                         *win.padding, int(flip)], dtype=torch.int64)


def read_plan(row: list[int]) -> tuple[tuple[int, int], CropWindow, bool]:
    """(source size, window, flip) back from a :func:`plan_row` (as a list of ints). The window's ``scale`` is the
    one actually applied to the width."""
    h, w, top, left, src_h, src_w, out_h, out_w, pl, pt, pr, pb, flip = (int(v) for v in row)
    return (h, w), CropWindow(out_w / src_w, top, left, src_h, src_w, out_h, out_w, (pl, pt, pr, pb)), bool(flip)


class EncodedTrainTransform:
    """The training transform for samples whose image is still encoded (``image_encoded`` bytes and the header's
    ``image_size``; see the module docstring). Draws exactly what :func:`build_train_transform` draws, in the same
    order: :meth:`RandomScaleCrop.window`, then (with ``hflip``) ``v2.RandomHorizontalFlip(p=0.5)``'s one
    ``torch.rand(1)``. Returns the sample with the label cropped and flipped, ``image_size`` replaced by
    ``image_plan`` (:func:`plan_row`)."""

    def __init__(self, crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                 hflip: bool = True) -> None:
        self.crop = RandomScaleCrop(crop_size, scale_range)
        self.hflip = hflip

    def __repr__(self) -> str:
        return f"EncodedTrainTransform({self.crop!r}, hflip={self.hflip})"

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        size = tuple(int(v) for v in sample["image_size"])
        win = self.crop.window(*size)
        # v2.RandomHorizontalFlip skips the flip when torch.rand(1) >= p: the same call and the same test here.
        flip = self.hflip and not bool(torch.rand(1) >= 0.5)
        out = {k: v for k, v in sample.items() if k != "image_size"}
        if "mask" in sample:
            mask = self.crop.crop_mask(sample["mask"], win)
            out["mask"] = F.horizontal_flip(mask) if flip else mask
        out["image_plan"] = plan_row((size[0], size[1]), win, flip)
        return out


def build_train_transform(crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                          hflip: bool = True, *, encoded: bool = False) -> v2.Compose | EncodedTrainTransform:
    """Random scale, pad and crop to ``crop_size`` (H, W), horizontal flip; uint8 in, uint8 out. ``encoded``: the
    same augmentation for samples whose image is decoded later, on the device (:class:`EncodedTrainTransform`)."""
    if encoded:
        return EncodedTrainTransform(crop_size, scale_range, hflip)
    steps: list[Any] = [RandomScaleCrop(crop_size, scale_range)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps)


def build_eval_transform() -> v2.Identity:
    """The whole image as decoded (uint8); see the module docstring."""
    return v2.Identity()


__all__ = ["PLAN_FIELDS", "CropWindow", "EncodedTrainTransform", "RandomScaleCrop", "build_eval_transform",
           "build_train_transform", "plan_row", "read_plan", "resize_window"]
