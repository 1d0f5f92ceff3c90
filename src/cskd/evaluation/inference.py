"""Dense prediction of full images: whole-image, sliding-window, multi-scale and flip inference.

Every mode ends the same way: class logits (float32) resized with bilinear interpolation to the label size, so
that metrics, maps and submissions all score one tensor. Where several predictions cover a pixel (overlapping
windows, scales, the flipped copy) their *logits* are averaged, as the published evaluation does.

``align_corners=True`` by default: the published CSKD/CIRKD code resizes logits (in training and in ``eval.py``)
with ``align_corners=True``, and its checkpoints score best, and as published, with the same choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Mode = Literal["whole", "slide"]
MODES: tuple[str, ...] = ("whole", "slide")
_AMP = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_amp(value: str | torch.dtype | None, device: torch.device | str) -> torch.dtype | None:
    """``"auto"`` → bf16 autocast on CUDA and none elsewhere (CPU autocast is slower than fp32 for these convs);
    ``"none"`` / None → no autocast; ``"bf16"`` / ``"fp16"`` or a dtype → that dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = value.lower()
    if key == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    if key in ("none", "fp32", "float32", "off"):
        return None
    if key not in _AMP:
        raise ValueError(f"unknown autocast dtype {value!r}; use auto, none, bf16 or fp16")
    return _AMP[key]


def _logits_of(out: Any) -> Tensor:
    """A Segmentor's SegOutput, a plain tensor (exported / scripted models) or a tuple whose first item is logits."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected a SegOutput, a tensor or a tuple of tensors")


def _pair(v: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if v is None:
        return None
    h, w = (v, v) if isinstance(v, int) else tuple(v)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return int(h), int(w)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride``, the last one flush with the end so the axis is covered.
    ``length`` is already padded to at least ``crop``."""
    if length <= crop:
        return [0]
    n = math.ceil((length - crop) / stride) + 1
    return sorted({min(i * stride, length - crop) for i in range(n)})


def _run(model: nn.Module, x: Tensor, amp_dtype: torch.dtype | None) -> Tensor:
    ctx = torch.autocast(device_type=x.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with ctx:
        out = _logits_of(model(x))
    return out.float()


def _resize(logits: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


def _predict_whole(
    model: nn.Module, x: Tensor, out_size: tuple[int, int], amp_dtype: torch.dtype | None, align_corners: bool
) -> Tensor:
    return _resize(_run(model, x, amp_dtype), out_size, align_corners)


def _predict_slide(
    model: nn.Module,
    x: Tensor,
    crop: tuple[int, int],
    stride: tuple[int, int],
    amp_dtype: torch.dtype | None,
    align_corners: bool,
    window_batch: int | None,
) -> Tensor:
    """Logits at ``x``'s size from overlapping ``crop`` windows, each window's logits resized to the crop and
    averaged where windows overlap."""
    b, _, h, w = x.shape
    ch, cw = crop
    # Images smaller than the crop are padded with 0, the mean colour after normalisation; the padding's logits
    # are cropped off below, so it only serves as context.
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    hp, wp = x.shape[-2:]
    boxes = [(y, x0) for y in window_starts(hp, ch, stride[0]) for x0 in window_starts(wp, cw, stride[1])]
    # Windows of all images go through the model together: one large batch keeps the GPU busy.
    windows = torch.cat([x[:, :, y:y + ch, x0:x0 + cw] for y, x0 in boxes])  # (n_windows·B)×C×ch×cw
    per_chunk = len(boxes) if window_batch is None else max(1, window_batch // b)
    canvas: Tensor | None = None
    count = torch.zeros(1, 1, hp, wp, device=x.device)
    for start in range(0, len(boxes), per_chunk):
        chunk = boxes[start:start + per_chunk]
        logits = _run(model, windows[start * b:(start + len(chunk)) * b], amp_dtype)
        logits = _resize(logits, crop, align_corners)
        if canvas is None:
            canvas = logits.new_zeros(b, logits.shape[1], hp, wp)
        for i, (y, x0) in enumerate(chunk):
            canvas[:, :, y:y + ch, x0:x0 + cw] += logits[i * b:(i + 1) * b]
            count[:, :, y:y + ch, x0:x0 + cw] += 1
    assert canvas is not None
    return (canvas / count)[:, :, :h, :w]


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Tensor,
    *,
    mode: Mode = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: Sequence[int] | None = None,
    amp_dtype: torch.dtype | None = None,
    align_corners: bool = True,
    window_batch: int | None = None,
) -> Tensor:
    """Float32 B×K×H×W logits at ``out_size`` (default: the images' size) for normalised float B×3×H×W ``images``.

    - ``mode="whole"``: the model sees each (rescaled) image at once; its stride-8 logits are resized straight to
      ``out_size``. This is the published Cityscapes protocol (1024×2048, one pass).
    - ``mode="slide"``: windows of ``crop_size`` every ``stride`` (default: two thirds of the crop, rounded up);
      images smaller than the crop are padded. ``window_batch`` caps how many windows run at once (default: all).
    - ``scales``: the image is resized by each factor first (bilinear); ``flip`` adds the mirrored image (run in
      the same batch). All predictions are averaged in logit space.

    The caller puts the model in eval mode (:func:`cskd.evaluation.evaluate` does); this function does not change
    it, nor gradients beyond ``no_grad``. ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the model under autocast;
    logits are cast to float32 before they are resized and averaged.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float B×3×H×W tensor (normalised), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of {', '.join(MODES)}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    crop = _pair(crop_size, "crop_size")
    step = _pair(stride, "stride")
    if mode == "slide":
        if crop is None:
            raise ValueError("mode='slide' needs crop_size (e.g. (512, 1024) for Cityscapes)")
        step = step or (math.ceil(crop[0] * 2 / 3), math.ceil(crop[1] * 2 / 3))
    b, _, h, w = images.shape
    size = (h, w) if out_size is None else (int(out_size[0]), int(out_size[1]))
    total: Tensor | None = None
    n = 0
    for s in scales:
        x = images
        if s != 1.0:
            scaled = (max(1, round(h * s)), max(1, round(w * s)))
            x = F.interpolate(images, size=scaled, mode="bilinear", align_corners=align_corners)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        if crop is not None and step is not None and mode == "slide":
            logits = _predict_slide(model, x, crop, step, amp_dtype, align_corners, window_batch)
            logits = _resize(logits, size, align_corners)
        else:
            logits = _predict_whole(model, x, size, amp_dtype, align_corners)
        if flip:
            logits = logits[:b] + logits[b:].flip(-1)
            n += 2
        else:
            n += 1
        total = logits if total is None else total.add_(logits)
    assert total is not None
    return total.div_(n)


__all__ = ["MODES", "Mode", "predict_logits", "resolve_amp", "window_starts"]
