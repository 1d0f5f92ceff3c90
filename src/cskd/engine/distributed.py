"""Process-group set-up for torchrun (``torchrun --nproc_per_node=N -m cskd distill CONFIG``).

One process per device. Without torchrun's environment variables everything here degrades to a single process,
so the same engine code runs unchanged on a laptop, one GPU, or many.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" → this process's GPU if there is one, else the CPU; "cuda" → GPU ``local_rank`` (torchrun's);
    "cpu", "cuda:N" as given. A malformed name or a GPU that is not there is an error saying what to use."""
    from ..errors import ConfigError

    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise ConfigError(f"device {preference!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {preference!r} requested but CUDA is not available; use --device cpu")
        if device.index is None:
            return torch.device("cuda", local_rank)
    return device


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistEnv", "all_gather_objects", "all_reduce_mean", "barrier", "broadcast_object", "cleanup",
           "init_distributed", "resolve_device"]
