"""The training augmentation (crop window first, resize only the window) against the textbook pipeline written
out independently here: resize the whole image by ``s``, pad where it is smaller than the crop, crop, flip.

Two checks: the draws (scale, window position, flip) have the same distribution at the Cityscapes geometry, and
where the textbook pipeline's window falls on whole source pixels the outputs agree away from the window border
(where the textbook pipeline's filter sees pixels outside the window and the fast path clamps at the edge).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cskd.data import RandomScaleCrop, mean_pixel

from test_data_transforms import blocky_sample


class Draw(NamedTuple):
    scale: float
    offset: tuple[int, int]  # crop offset in the scaled image (0 where the axis is padded)
    pad_before: tuple[int, int]  # (top, left) padding where the scaled image is smaller than the crop
    flip: bool


def _uniform_int(low: int, high: int) -> int:
    return low if high <= low else int(torch.randint(low, high + 1, ()).item())


def reference_draw(h: int, w: int, crop: tuple[int, int], scale_range: tuple[float, float]) -> Draw:
    """Scale, then per axis a crop offset in the scaled image (or the padding before it), then the flip."""
    lo, hi = scale_range
    s = lo + (hi - lo) * float(torch.rand(()).item())
    offset, pad = [0, 0], [0, 0]
    for axis, (src, c) in enumerate(zip((h, w), crop)):
        scaled = max(1, round(src * s))
        if scaled >= c:
            offset[axis] = _uniform_int(0, scaled - c)
        else:
            pad[axis] = _uniform_int(0, c - scaled)
    return Draw(s, (offset[0], offset[1]), (pad[0], pad[1]), bool(torch.rand(1).item() < 0.5))


def reference_apply(sample: dict, d: Draw, crop: tuple[int, int]) -> dict:
    """Resize the whole image by ``d.scale`` (bilinear + antialias; labels nearest), pad, crop, flip."""
    image, mask = sample["image"], sample["mask"]
    h, w = image.shape[-2:]
    size = [max(1, round(h * d.scale)), max(1, round(w * d.scale))]
    img = F.resize(tv_tensors.Image(image), size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    lab = F.resize(tv_tensors.Mask(mask), size, interpolation=v2.InterpolationMode.NEAREST)
    after = [max(0, c - n - p) for c, n, p in zip(crop, size, d.pad_before)]
    padding = [d.pad_before[1], d.pad_before[0], after[1], after[0]]
    img = F.pad(img, padding, fill=list(mean_pixel()))
    lab = F.pad(lab, padding, fill=255)
    (t, l), (ch, cw) = d.offset, crop
    img, lab = img[..., t:t + ch, l:l + cw], lab[..., t:t + ch, l:l + cw]
    if d.flip:
        img, lab = img.flip(-1), lab.flip(-1)
    return {"image": img, "mask": lab}


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


# The published recipe (1024×2048 → 512×1024, scale 0.5-2: never pads), and a half-size source that pads at s < 1.
@pytest.mark.parametrize("h,w", [(1024, 2048), (512, 1024)])
def test_draws_have_the_reference_distribution(h, w):
    crop, scales, n = (512, 1024), (0.5, 2.0), 5_000
    t = RandomScaleCrop(crop, scales)
    new: dict[str, list[float]] = {"scale": [], "u_top": [], "u_left": [], "pad_top": [], "flip": []}
    ref: dict[str, list[float]] = {k: [] for k in new}
    for seed in range(n):
        torch.manual_seed(seed)
        win = t.window(h, w)
        flip = bool(torch.rand(1).item() < 0.5)  # v2.RandomHorizontalFlip's draw
        new["scale"].append(win.out_w / win.src_w)  # the scale the width is actually resized by
        new["flip"].append(flip)
        for key, start, length, src in (("u_top", win.top, win.src_h, h), ("u_left", win.left, win.src_w, w)):
            if src > length:  # window position as a fraction of its free range, in source pixels
                new[key].append(start / (src - length))
        if win.padding[1] + win.padding[3]:
            new["pad_top"].append(win.padding[1] / (win.padding[1] + win.padding[3]))

        torch.manual_seed(seed)
        d = reference_draw(h, w, crop, scales)
        ref["scale"].append(max(1, round(w * d.scale)) / w)
        ref["flip"].append(d.flip)
        for key, axis, src, c in (("u_top", 0, h, crop[0]), ("u_left", 1, w, crop[1])):
            scaled = max(1, round(src * d.scale))
            if scaled > c:
                ref[key].append(d.offset[axis] / (scaled - c))
        scaled_h = max(1, round(h * d.scale))
        if scaled_h < crop[0]:
            ref["pad_top"].append(d.pad_before[0] / (crop[0] - scaled_h))
        # The same seed draws the same scale: both resize by it up to rounding to whole pixels (≤ 0.5/256).
        assert abs(new["scale"][-1] / ref["scale"][-1] - 1) < 2.5e-3

    # KS critical distance at α = 0.001 for two samples of these sizes: 1.95·sqrt((n+m)/(n·m)).
    for key in new:
        a, b = np.asarray(new[key], float), np.asarray(ref[key], float)
        assert abs(len(a) - len(b)) <= 0.005 * n, key  # as many padded / cropped axes
        if len(a) == 0:
            continue
        assert _ks(a, b) < 1.95 * np.sqrt((len(a) + len(b)) / (len(a) * len(b))), key
    # The same seed flips alike, unless one path drew one number fewer (a window exactly as wide as its axis).
    assert abs(np.mean(new["flip"]) - 0.5) < 0.03 and np.mean(np.equal(new["flip"], ref["flip"])) > 0.99
    assert abs(np.mean(new["u_left"]) - 0.5) < 0.01 and abs(np.mean(new["u_top"]) - 0.5) < 0.01


# (source H×W, crop, scale): upscaling, identity, a fractional scale, downscaling, padding on one or both axes.
CASES = [((48, 80), (64, 96), 2.0), ((64, 96), (40, 56), 1.0), ((64, 128), (48, 96), 1.5),
         ((128, 192), (48, 72), 0.75), ((40, 160), (48, 64), 1.0), ((64, 96), (48, 64), 0.5)]


@pytest.mark.parametrize("src,crop,scale", CASES)
def test_outputs_agree_with_the_reference_where_it_is_representable(src, crop, scale):
    t = v2.Compose([RandomScaleCrop(crop, (scale, scale)), v2.RandomHorizontalFlip(0.5)])
    compared = border_free = 0
    for seed in range(200):
        torch.manual_seed(seed)
        win = RandomScaleCrop(crop, (scale, scale)).window(*src)
        flip = bool(torch.rand(1).item() < 0.5)
        offset = (win.top * scale, win.left * scale)
        if any(o != int(o) for o in offset):
            continue  # the textbook window starts between source pixels: not representable by a source crop
        d = Draw(scale, (int(offset[0]), int(offset[1])), (win.padding[1], win.padding[0]), flip)
        sample = blocky_sample(*src, block=6, seed=seed)
        want = reference_apply(sample, d, crop)
        torch.manual_seed(seed)
        got = t(sample)
        assert got["image"].shape == want["image"].shape and got["mask"].shape == want["mask"].shape
        # Labels (nearest picks the same source pixel: measured 100 % in every case; threshold 99.9 %).
        same = (got["mask"] == want["mask"]).float().mean().item()
        assert same >= 0.999, same
        # Image: within 1 grey level (uint8 rounding) away from a 2-pixel band (3 when downscaling: the antialias
        # filter is wider) along each cropped window edge; in the band the textbook filter mixes in outside pixels.
        diff = (got["image"].int() - want["image"].int()).abs()
        b = 3 if scale < 1 else 2
        inner = diff
        if win.src_h < src[0]:
            inner = inner[:, b:-b]
        if win.src_w < src[1]:
            inner = inner[:, :, b:-b]
        assert inner.max() <= 1, (seed, int(inner.max()))
        assert diff.float().mean() < 2.0  # and the band itself is close too
        compared += 1
        border_free += int(diff.max() <= 1)
        if compared == 20:
            break
    assert compared >= 10
    if scale <= 1.0 and src[0] * scale <= crop[0] and src[1] * scale <= crop[1]:
        assert border_free == compared  # the whole image is resized: both paths are the same operation
