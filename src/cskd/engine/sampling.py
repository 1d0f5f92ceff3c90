"""Training-data order and augmentation that depend only on (seed, epoch, index).

The batch sampler yields ``(epoch, index)`` keys forever, sharded across processes; the dataset wrapper seeds the
augmentation RNGs from each key. A sample's crop, scale and flip are then the same whatever the number of loader
workers, and a run resumed at iteration k sees exactly the batches an uninterrupted run would have seen: the
position is a pure function of the iteration count, so no sampler state has to be saved.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from ..errors import DataError

Key = tuple[int, int]


def _mix(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class SeededBatchSampler(Sampler[list[Key]]):
    """Endless batches of ``(epoch, index)``: each epoch a fresh permutation (seeded by seed and epoch), each
    process its own shard of it, incomplete batches dropped (CKA-based losses need full batches)."""

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> None:
        per_rank = num_samples // world_size
        if per_rank < batch_size:
            raise DataError(
                f"the training split has {num_samples} samples: fewer than one batch of {batch_size} per process "
                f"({world_size} process(es)); use a smaller train.batch_size or more data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = per_rank
        self.batches_per_epoch = per_rank // batch_size
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            perm = torch.randperm(self.num_samples, generator=g)[: self.per_rank * self.world_size]
            shard = perm[self.rank :: self.world_size].tolist()
            for b in range(offset, self.batches_per_epoch):
                chunk = shard[b * self.batch_size : (b + 1) * self.batch_size]
                yield [(epoch, i) for i in chunk]
            epoch, offset = epoch + 1, 0


class SeededSamples(Dataset):
    """Wraps a dataset so that ``ds[(epoch, index)]`` applies ``transform`` under RNGs seeded from the key.

    The global RNG states are forked and restored around each sample, so loading in the main process
    (``workers: 0``) leaves the training RNG (dropout, random projections) untouched."""

    def __init__(self, dataset: Dataset, transform: Callable[[dict[str, Any]], dict[str, Any]] | None, seed: int):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Key) -> dict[str, Any]:
        epoch, index = key
        s = _mix(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s)
            try:
                sample = self.dataset[index]
                return self.transform(sample) if self.transform is not None else sample
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class StampedCollate:
    """The default collate, plus ``ready_at``: when the batch was made (``time.monotonic``, one clock for every
    process of the host), so that a time-budget calibration can read the loader's pace whatever its queue holds."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(items)
        batch["ready_at"] = time.monotonic()
        return batch


__all__ = ["SeededBatchSampler", "SeededSamples", "StampedCollate"]
