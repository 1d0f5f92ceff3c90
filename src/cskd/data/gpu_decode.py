"""Training JPEGs decoded on the GPU (``data.decode``), with the augmentation the loader workers would have applied.

Decoding is most of a loader worker's time (docs/benchmarks.md, "Data pipeline"). With ``data.decode: gpu`` the
workers read each training JPEG's bytes and its header's size, decode and crop the label, and draw the scale, the
crop window and the flip with the same RNG calls as the CPU path (:class:`~cskd.data.transforms.EncodedTrainTransform`);
the batch carries the bytes, the file names and one ``image_plan`` row per sample. :func:`decode_batch`, called by
the engine's ``StepRunner.prepare``, decodes the batch with nvJPEG (one batched ``torchvision.io.decode_jpeg``
call, RGB), then resizes each window (bilinear, antialiased), pads it with the mean colour and flips it on the
device: the same operations as the CPU path, in the same order, so a ``(seed, epoch, index)`` key gives the same
label exactly and the same image up to the decoders' (libjpeg-turbo vs nvJPEG) rounding. Validation always
decodes on the CPU (whole images of varying size, a few times per run).

Where nvJPEG cannot help, the CPU decoder (:func:`cskd.data.io.decode_image_bytes`) decodes that one image in the
main process and the rest of the batch stays on the GPU: files whose header is not a one- or three-channel JPEG
(CMYK, a PNG named .jpg), and files nvJPEG refuses (each is tried alone, warned about once, and not offered to
nvJPEG again in this process). A file neither can decode is a DataError naming it; ``data.skip_bad`` cannot
replace it at that point (its label has been cropped already), so the message says how to find such files.
Baseline JPEGs go to the GPU's hardware decoder where it has one (A100, H100, H200); progressive ones take
nvJPEG's hybrid path, whose Huffman decoding runs on the host, in the training process.

Streams. torchvision allocates the decoded images on the *current* stream and decodes on a private one without
waiting for the current stream; the caching allocator may then hand it memory that kernels still queued on the
training stream are about to read (and nvJPEG's hardware engine has been reported to write its output before the
work queued on its own stream has run). The decode therefore runs with a side stream current, whose memory pool
holds only earlier decoded images, each marked ``record_stream`` for the training stream that reads them: a block
is reused only once the training stream is done with it. The training stream then waits for the side stream.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .io import JPEG_SUFFIXES, decode_image_bytes
from .normalize import mean_pixel
from .transforms import read_plan, resize_window

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without its (deprecated) decoders: data.decode stays on the CPU
    decode_jpeg = None

ENCODED_KEY = "image_encoded"
"""The batch key that marks a batch whose images are still encoded."""

_ALLOW_CPU_DEVICE = False
"""Tests only: let ``data.decode: gpu`` run with a CPU training device. ``decode_jpeg`` then decodes on the CPU,
with the libjpeg-turbo that the loader uses, so the engine's encoded path runs (and matches exactly) in CPU tests."""

_refused: dict[str, str] = {}  # file → why nvJPEG refused it, in this process: decoded on the CPU since
_side_streams: dict[torch.device, Any] = {}
_fills: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
_probed: dict[torch.device, str | None] = {}


def is_encoded(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` holds encoded images (``data.decode: gpu``) for :func:`decode_batch`."""
    return ENCODED_KEY in batch


def resolve_decode(setting: str, device: torch.device, image_paths: Sequence[str | Path],
                   cached: bool = False) -> Literal["cpu", "gpu"]:
    """Where the training images are decoded for ``data.decode`` = ``setting`` on ``device``, given the training
    split's image files: ``auto`` = ``gpu`` on CUDA when every file is a JPEG (.jpg/.jpeg) and torchvision decodes
    JPEGs on this GPU, else ``cpu``. ``gpu`` where that does not hold is a ConfigError naming the key. ``cached``
    (``data.cache`` is set): the CPU path's decoded-sample cache leaves nothing to decode, so ``auto`` is ``cpu``
    and ``gpu`` an error naming both keys."""
    device = torch.device(device)
    if setting == "cpu":
        return "cpu"
    if setting not in ("auto", "gpu"):
        raise ConfigError(f"data.decode must be one of 'auto', 'cpu', 'gpu', got {setting!r}")
    if cached:
        if setting == "auto":
            return "cpu"
        raise ConfigError("data.decode=gpu and data.cache exclude each other: the cache keeps decoded samples for "
                          "the loader workers (memory-mapped, nothing left to decode); set data.cache: null, or "
                          "data.decode: auto or cpu")
    cuda = device.type == "cuda"
    if not cuda:
        if setting == "auto":
            return "cpu"
        if not _ALLOW_CPU_DEVICE:
            raise ConfigError(f"data.decode=gpu needs a CUDA training device, but train.device gives {device}; "
                              "use data.decode: auto (the GPU where it applies) or cpu")
    other = [p for p in image_paths if Path(p).suffix.lower() not in JPEG_SUFFIXES]
    if other:
        if setting == "auto":
            return "cpu"
        raise ConfigError(f"data.decode=gpu decodes JPEG training images, but {len(other)} of {len(image_paths)} "
                          f"files of the training split are not .jpg/.jpeg (e.g. {other[0]}); use data.decode: "
                          "auto or cpu")
    problem = _probe(device) if cuda else (None if decode_jpeg is not None else "torchvision has no decode_jpeg")
    if problem is not None:
        if setting == "gpu":
            raise ConfigError(f"data.decode=gpu: torchvision cannot decode JPEGs on {device} ({problem}); use "
                              "data.decode: auto or cpu")
        warnings.warn(f"data.decode=auto: torchvision cannot decode JPEGs on {device} ({problem}); the loader "
                      "workers decode them", stacklevel=2)
        return "cpu"
    return "gpu"


def _probe(device: torch.device) -> str | None:
    """None if a tiny JPEG decodes on ``device`` (nvJPEG present and working), else why not."""
    if device not in _probed:
        if decode_jpeg is None:
            _probed[device] = "torchvision has no decode_jpeg"
        else:
            from PIL import Image

            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, "JPEG")
            try:
                img = _device_decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)[0]
                _probed[device] = None if tuple(img.shape) == (3, 16, 16) else f"decoded shape {tuple(img.shape)}"
            except Exception as e:  # noqa: BLE001 - any failure means: not on this device
                _probed[device] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return _probed[device]


def _device_decode(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """One batched ``decode_jpeg`` (RGB) onto ``device``; see the module docstring for the streams."""
    assert decode_jpeg is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        if device.type != "cuda":
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        side = _side_streams.get(device)
        if side is None:
            side = _side_streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            images = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    current = torch.cuda.current_stream(device)
    current.wait_stream(side)
    for img in images:
        img.record_stream(current)
    return images


def _decode_one(data: bytes, path: str, device: torch.device, why: str | None) -> Tensor:
    """The CPU decoder's image of ``data`` on ``device``; ``why``: the device decoder's refusal, warned about."""
    try:
        img = decode_image_bytes(data, path)
    except DataError as e:
        raise DataError(f"{e} (found when decoding its batch on {device}, where data.skip_bad cannot replace it; "
                        "`cskd data check` lists such files, and data.decode: cpu skips them with skip_bad)") from None
    if why is not None:
        warnings.warn(f"{path}: the {device.type} JPEG decoder refused it ({why}); decoded on the CPU instead, here "
                      "and from now on", stacklevel=3)
    return img.to(device)


def _decode_images(data: Sequence[bytes], nvjpeg: Sequence[bool], paths: Sequence[str],
                   device: torch.device) -> list[Tensor]:
    out: list[Tensor | None] = [None] * len(data)
    offer = [i for i in range(len(data)) if nvjpeg[i] and paths[i] not in _refused]
    if offer:
        tensors = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in offer]
        try:
            for i, img in zip(offer, _device_decode(tensors, device)):
                out[i] = img
        except RuntimeError:  # one bad file fails the batched call: find it, decode the others
            for i, t in zip(offer, tensors):
                try:
                    out[i] = _device_decode([t], device)[0]
                except RuntimeError as e:
                    text = str(e).strip().splitlines()
                    _refused[paths[i]] = text[-1][:200] if text else type(e).__name__
                    out[i] = _decode_one(data[i], paths[i], device, _refused[paths[i]])
    return [img if img is not None else _decode_one(data[i], paths[i], device, None) for i, img in enumerate(out)]


def _list(values: Any) -> list[Any]:
    return values.tolist() if isinstance(values, Tensor) else list(values)


def decode_batch(batch: dict[str, Any], device: str | torch.device,
                 fill: tuple[int, int, int] | None = None) -> Tensor:
    """An encoded training batch (``image_encoded``, ``image_nvjpeg``, ``image_path``, ``image_plan``, as the
    DataLoader collates them) → the B×3×H×W uint8 images on ``device`` that the CPU path would have produced:
    decoded, each window resized (bilinear, antialiased), padded with ``fill`` (default: the mean colour, as
    :class:`~cskd.data.transforms.RandomScaleCrop`) and flipped as its plan says."""
    device = torch.device(device)
    data, paths = list(batch[ENCODED_KEY]), [str(p) for p in batch["image_path"]]
    nvjpeg = [bool(v) for v in _list(batch["image_nvjpeg"])]
    plans = [read_plan(row) for row in _list(batch["image_plan"])]
    images = _decode_images(data, nvjpeg, paths, device)
    _, win0, _ = plans[0]
    crop = (win0.out_h + win0.padding[1] + win0.padding[3], win0.out_w + win0.padding[0] + win0.padding[2])
    colour = tuple(mean_pixel() if fill is None else fill)
    key = (device, colour)
    if key not in _fills:
        _fills[key] = torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1).to(device)
    out = torch.empty((len(images), 3, *crop), dtype=torch.uint8, device=device)
    out.copy_(_fills[key].expand_as(out))
    for i, (img, ((h, w), win, flip)) in enumerate(zip(images, plans)):
        if tuple(img.shape[-2:]) != (h, w):
            raise DataError(f"{paths[i]}: decoded as {img.shape[-2]}×{img.shape[-1]} but its header gives {h}×{w}")
        content = resize_window(img, win)
        left, top, right, _ = win.padding
        if flip:  # the CPU path flips the padded crop: the content mirrored, and the left/right padding swapped
            content, left = content.flip(-1), right
        out[i, :, top:top + win.out_h, left:left + win.out_w] = content
    return out


__all__ = ["ENCODED_KEY", "decode_batch", "is_encoded", "resolve_decode"]
