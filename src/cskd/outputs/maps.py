"""Pictures of predictions: palette maps, overlays on the image, and side-by-side panels for reports.

Masks are H×W class ids (train ids) as a tensor or array; the ignore value (255) and ids the palette does not
cover are drawn black in palette maps and leave the image untouched in overlays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..constants import IGNORE_INDEX

Palette = Sequence[Sequence[int]]
ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_mask(mask: ArrayLike | Image.Image) -> np.ndarray:
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"a mask must be H×W class ids, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"mask values must lie in 0..255 to be drawn, got {mask.min()}..{mask.max()}")
        mask = mask.astype(np.uint8)
    return mask


def _as_image(image: ArrayLike | Image.Image) -> np.ndarray:
    """uint8 H×W×3 from a PIL image, an H×W×3 array or a 3×H×W tensor/array (the data loader's layout)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"an image must be H×W×3 or 3×H×W, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"an image must be uint8 (0..255), got {arr.dtype}; pass the un-normalised image")
    return np.ascontiguousarray(arr)


def palette_lut(palette: Palette, ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """256×3 uint8 colour table: the palette for its ids, ``ignore_color`` for every other value (255 included)."""
    if len(palette) > 255:
        raise ValueError(f"a palette holds at most 255 classes (255 is the ignore value), got {len(palette)}")
    lut = np.tile(np.asarray(ignore_color, dtype=np.uint8), (256, 1))
    if len(palette):
        lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return lut


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct colours for a model whose dataset palette is unknown: the PASCAL VOC colour map (class id bits
    spread over the high bits of R, G and B), so neighbouring ids get clearly different colours. It is shifted by
    one so that no class is drawn black, the colour of ignored pixels."""
    colors = []
    for cid in range(num_classes):
        r = g = b = 0
        c = cid + 1
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append((r, g, b))
    return tuple(colors)


def colorize(mask: ArrayLike | Image.Image, palette: Palette) -> Image.Image:
    """An indexed ("P") PNG-ready image: pixel values stay the class ids, the dataset palette is attached.

    Tools that read the values (and the Cityscapes viewer) see the ids; viewers show the colours.
    """
    m = np.ascontiguousarray(_as_mask(mask))
    img = Image.frombytes("P", (m.shape[1], m.shape[0]), m.tobytes())
    img.putpalette(palette_lut(palette).reshape(-1).tolist())
    return img


def colorize_rgb(mask: ArrayLike | Image.Image, palette: Palette) -> np.ndarray:
    """H×W×3 uint8 colours of ``mask`` (ignore and unknown ids black)."""
    return palette_lut(palette)[_as_mask(mask)]


def blend(
    image: ArrayLike | Image.Image, mask: ArrayLike | Image.Image, palette: Palette, alpha: float = 0.5
) -> Image.Image:
    """RGB overlay: ``(1 − alpha)·image + alpha·colour`` on labelled pixels; ignored pixels (255, or ids outside
    the palette) show the image as is, so "not predicted" never looks like a class."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    img = _as_image(image)
    m = _as_mask(mask)
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask size {m.shape} differs from image size {img.shape[:2]}")
    colors = palette_lut(palette)[m].astype(np.float32)
    mixed = (1.0 - alpha) * img.astype(np.float32) + alpha * colors
    labelled = (m < len(palette)) & (m != IGNORE_INDEX)
    out = np.where(labelled[..., None], np.rint(mixed), img).astype(np.uint8)
    return Image.fromarray(out)


def _font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(12, height // 28)
    try:  # Pillow ≥ 10.1 scales its built-in font; older ones only have the small bitmap font.
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` shortened with "..." so that it stays above its own tile instead of running into the next title."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def make_panel(
    images: Sequence[ArrayLike | Image.Image],
    titles: Sequence[str] | None = None,
    *,
    gap: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
    text_color: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Tiles side by side, each with its title above (e.g. image | ground truth | prediction | teacher).

    Tiles of a different height are resized (aspect kept) to the first tile's height. Palette images are drawn in
    their colours.
    """
    if not images:
        raise ValueError("make_panel needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    tiles = [im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(_as_image(im)) for im in images]
    h = tiles[0].height
    tiles = [t if t.height == h else t.resize((max(1, round(t.width * h / t.height)), h), Image.BILINEAR)
             for t in tiles]
    font = _font(h)
    title_h = 0
    if titles:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        title_h = max(probe.textbbox((0, 0), t or " ", font=font)[3] for t in titles) + 2 * gap
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    panel = Image.new("RGB", (width, title_h + h), background)
    draw = ImageDraw.Draw(panel)
    x = 0
    for i, tile in enumerate(tiles):
        panel.paste(tile, (x, title_h))
        if titles:
            draw.text((x + gap, gap), _fit(draw, titles[i], font, tile.width - 2 * gap), fill=text_color, font=font)
        x += tile.width + gap
    return panel


__all__ = ["blend", "colorize", "colorize_rgb", "default_palette", "make_panel", "palette_lut"]
