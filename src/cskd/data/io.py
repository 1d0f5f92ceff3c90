"""Decoding images and label maps, with errors that name the file and say what is wrong.

torchvision's ``decode_image`` (libjpeg-turbo / libpng into a C×H×W tensor, no Python per-pixel work) is the fast
path; Pillow is the fallback for what it does not handle (a 16-bit or oddly encoded label PNG, TIFF, BMP) and for
telling corrupt files apart. torchvision 0.29 deprecates its decoders in favour of TorchCodec; its deprecation
warning is silenced here, and should a future torchvision drop them, everything goes through Pillow unchanged.
Label files must hold class values directly (one channel); an RGB label is almost always a colour visualisation
picked up by mistake.

:func:`read_encoded_image` is the loader side of ``data.decode: gpu``: the file's bytes and what its header says
(size, and whether nvJPEG can decode it), without decoding the pixels; :func:`decode_image_bytes` is the CPU decode
of such bytes, exactly :func:`read_image`'s.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .info import LabelTable

try:
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # a torchvision without the (deprecated) decoders
    decode_image = None


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"})
"""The file endings searched for when a folder of images is given (``cskd predict``, ``cskd export --verify-images``)."""

JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
"""The file endings of a JPEG split (``data.decode``: what ``auto`` decodes on the GPU)."""


def _tv_decode(data: torch.Tensor, rgb: bool) -> torch.Tensor | None:
    """torchvision's decode, or None when it is unavailable or refuses the bytes (Pillow then decides)."""
    if decode_image is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(data, mode=ImageReadMode.RGB if rgb else ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None


def _pil_open(path: Path, what: str, data: bytes | None = None) -> Image.Image:
    """The fully decoded Pillow image of ``path`` (or of its bytes ``data``, already read)."""
    im = None
    try:
        im = Image.open(path if data is None else io.BytesIO(data))
        im.load()  # force the full decode: a truncated file fails here, not later
        return im
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if im is not None:
            im.close()
        raise DataError(f"{path}: cannot read {what} ({_reason(e, data)}); the file is corrupt, truncated or not an "
                        "image") from None


def _reason(error: Exception, data: bytes | None) -> str:
    """Pillow's message, without the in-memory file object it names when it read from bytes."""
    if data is not None and isinstance(error, UnidentifiedImageError):
        return "unidentified image format"
    return str(error)


def _read_file(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} file ({e.strerror or e})") from None
    if not data:
        raise DataError(f"{path}: {what} file is empty")
    return data


def _read_bytes(path: Path, what: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(_read_file(path, what)), dtype=torch.uint8)


def _decode_rgb(data: torch.Tensor, path: Path, pil_data: bytes | None) -> torch.Tensor:
    img = _tv_decode(data, rgb=True)
    if img is not None and img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3:
        return img
    im = _pil_open(path, "image", pil_data)
    return torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def read_image(path: str | Path) -> torch.Tensor:
    """3×H×W uint8 RGB (grey and palette images are expanded, alpha is dropped)."""
    path = Path(path)
    return _decode_rgb(_read_bytes(path, "image"), path, None)


def decode_image_bytes(data: bytes, path: str | Path) -> torch.Tensor:
    """The bytes ``data`` of the image file ``path`` → what :func:`read_image` gives for that file (the same
    decoders, the same errors naming the file)."""
    return _decode_rgb(torch.frombuffer(bytearray(data), dtype=torch.uint8), Path(path), data)


class EncodedImage(NamedTuple):
    """An image file read but not decoded (:func:`read_encoded_image`)."""

    data: bytes
    size: tuple[int, int]
    """(H, W) as the header gives it (before any EXIF rotation, which no decoder here applies)."""
    nvjpeg: bool
    """A JPEG of one or three channels, which nvJPEG decodes; anything else (CMYK, a PNG named .jpg) is decoded by
    :func:`decode_image_bytes` instead."""


def read_encoded_image(path: str | Path) -> EncodedImage:
    """The bytes of an image file and what its header says, without decoding the pixels (~0.1 ms: Pillow parses
    the markers up to the first scan). A missing, empty or unidentifiable file, or a header cut short, raises the
    same one-line DataError naming the file as :func:`read_image`; damage inside the pixel data shows only when the
    bytes are decoded."""
    path = Path(path)
    data = _read_file(path, "image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({_reason(e, data)}); the file is corrupt, truncated or not an "
                        "image") from None
    return EncodedImage(data, (h, w), fmt == "JPEG" and mode in ("RGB", "L"))


def read_label(path: str | Path) -> np.ndarray:
    """H×W uint8 array of the values stored in a label file (class ids or palette indices)."""
    path = Path(path)
    lab = _tv_decode(_read_bytes(path, "label"), rgb=False)
    if lab is not None and lab.dtype == torch.uint8 and lab.ndim == 3 and lab.shape[0] == 1:
        return lab[0].numpy()
    im = _pil_open(path, "label")
    if im.mode in ("L", "P"):  # P: VOC's palette PNGs, whose indices are the class ids
        return np.array(im, dtype=np.uint8)
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.array(im)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"{path}: 16/32-bit label with values up to {int(arr.max())}; labels must be 8-bit "
                            "class ids (0–255)")
        return arr.astype(np.uint8)
    raise DataError(f"{path}: label image has mode {im.mode} ({len(im.getbands())} channels); labels must be "
                    "single-channel class ids. Is this a colour visualisation instead of the id/annotation file?")


def map_label(raw: np.ndarray, table: LabelTable, path: str | Path) -> np.ndarray:
    """Stored values → train ids (255 = ignore) through the table; values the dataset does not define are an error
    naming the file and the offending values."""
    hi = int(raw.max()) if raw.size else 0
    if not table.valid[: hi + 1].all():  # only then can an undefined value be present: look closer
        bad = ~table.valid[raw]
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in values[:8]) + (" …" if len(values) > 8 else "")
            raise DataError(f"{path}: label holds value(s) {shown} ({int(bad.sum())} pixels) outside this "
                            f"dataset's ids ({table.valid_values}); wrong dataset, or a corrupt/colour label file?")
    return np.take(table.to_train, raw)


__all__ = ["IMAGE_SUFFIXES", "JPEG_SUFFIXES", "EncodedImage", "decode_image_bytes", "map_label", "read_encoded_image",
           "read_image", "read_label"]
