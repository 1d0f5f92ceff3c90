"""Scoring a model on a labelled split: the loop the engine's validation and ``cskd eval`` share."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
import time
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from ..constants import IGNORE_INDEX
from ..data.normalize import normalize
from ..data.workers import iterate as iterate_loader
from ..errors import DataError
from ..timing import WaitClock, synchronize
from .inference import Mode, predict_logits
from .metrics import ConfusionMatrix, SegMetrics


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel. Evaluation calls it directly: a DDP forward may broadcast buffers,
    a collective that would hang when ranks hold different numbers of batches (as unpadded shards do)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch ``model`` to eval mode for the block and restore its previous mode afterwards (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, …``: each item on exactly one rank. Unlike ``DistributedSampler`` it pads
    nothing, so no image is scored twice and the reduced confusion matrix is exactly that of the split."""

    def __init__(self, length: int, rank: int | None = None, world_size: int | None = None) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        self.length = length

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def collate_eval(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack images / masks when all share a size, else keep them as lists (VOC, ADE20K: sizes vary per image);
    :func:`evaluate` takes either."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], Tensor):
            same = all(v.shape == values[0].shape for v in values)
            out[key] = torch.stack(values) if same else values
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def _groups(images: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """(B×3×H×W, B×H×W) pairs: the batch itself, or one pair per image when the loader kept a list."""
    if isinstance(images, Tensor) and isinstance(masks, Tensor):
        yield (images if images.dim() == 4 else images[None]), (masks if masks.dim() == 3 else masks[None])
        return
    for img, mask in zip(images, masks, strict=True):
        yield (img if img.dim() == 4 else img[None]), (mask if mask.dim() == 3 else mask[None])


class Uploader:
    """Host → device copies of the loader's images and masks. On CUDA each copy runs on a side stream that the
    compute stream then waits for: eager inference keeps the host ahead of the GPU, so the next image's copy
    (8 MB for a 1024×2048 image and its mask, from pinned memory) overlaps the previous image's kernels instead of
    queueing behind them. Elsewhere a plain ``.to(device)``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        if self.stream is None:
            return tuple(t.to(self.device, non_blocking=True) for t in tensors)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            out = tuple(t.to(self.device, non_blocking=True) for t in tensors)
        compute.wait_stream(self.stream)
        for t in out:  # allocated on the side stream, used on the compute stream: not reused before that is done
            t.record_stream(compute)
        return out


def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    device: torch.device | str,
    mode: Mode = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    align_corners: bool = True,
    window_batch: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    timing: dict[str, float] | None = None,
    channels_last: bool = False,
    compiled: bool = True,
) -> SegMetrics:
    """Score ``model`` on the batches of ``loader`` (dicts with uint8 ``"image"`` B×3×H×W and ``"mask"`` B×H×W,
    or lists of per-image tensors, see :func:`collate_eval`) and return the split's metrics.

    The model runs in eval mode under ``torch.inference_mode`` and gets its training mode back afterwards.
    Images are normalised on the device; predictions are resized to each mask's size (see
    :func:`~cskd.evaluation.predict_logits` for the inference options). Under DDP each rank scores the batches its
    loader yields (use :class:`ShardSampler` so no image counts twice) and the confusion matrices are summed, so
    every rank returns the split's metrics. ``max_batches`` stops early (a quick check during training).

    ``channels_last`` feeds the images in that memory format (for a model stored so, as training does on CUDA).
    ``compiled=False`` runs a ``torch.compile``-d model eagerly (``torch.compiler.set_stance("force_eager")``):
    the evaluation shape and eval mode would otherwise compile a second graph, with the image size marked dynamic.

    ``timing``, a dict, receives ``first_batch_seconds`` (from the call to the end of the first batch: the loader's
    first decode, and a compile or cuDNN autotuning for a new size), ``images`` and ``images_per_second`` after
    the first batch, metric included (one device synchronisation, after the first batch, is added for it), and
    ``loader_wait_seconds``, the host's wait for batches after the first one: near 0 when the loader keeps up, most
    of the time after the first batch when the loop is loader-bound.
    """
    device = torch.device(device)
    net = unwrap_model(model)
    cm = ConfusionMatrix(num_classes, device=device, ignore_index=ignore_index)
    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="eval", unit="batch", dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    first_done: float | None = None
    scored = first_scored = 0
    stance = torch.compiler.set_stance("force_eager") if not compiled and hasattr(torch.compiler, "set_stance") \
        else nullcontext()
    batches = WaitClock(iterate_loader(loader))
    upload = Uploader(device)
    waited_at_first = 0.0
    with eval_mode(net), torch.inference_mode(), stance:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            if "mask" not in batch:
                raise DataError("evaluate: the batches carry no 'mask' (an unlabelled split such as Cityscapes test "
                                "cannot be scored; use `cskd predict` to write its predictions)")
            for images, masks in _groups(batch["image"], batch["mask"]):
                x, target = upload(images, masks)
                x = normalize(x)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = predict_logits(
                    net, x, mode=mode, crop_size=crop_size, stride=stride, scales=scales, flip=flip,
                    out_size=target.shape[-2:], amp_dtype=amp_dtype, align_corners=align_corners,
                    window_batch=window_batch,
                )
                cm.update(logits.argmax(1), target)
                scored += target.shape[0]
            if timing is not None and first_done is None:
                synchronize(device)
                first_done, first_scored = time.perf_counter(), scored
                waited_at_first = batches.seconds
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    metrics = cm.reduce_().compute()  # reads the matrix back: the one synchronisation of the loop
    if timing is not None:
        end = time.perf_counter()
        timing["first_batch_seconds"] = (first_done or end) - start
        timing["images"] = float(scored)
        rest = scored - first_scored
        timing["images_per_second"] = rest / (end - first_done) if first_done is not None and rest else float("nan")
        timing["loader_wait_seconds"] = batches.seconds - waited_at_first
    return metrics


__all__ = ["ShardSampler", "Uploader", "collate_eval", "eval_mode", "evaluate", "unwrap_model"]
