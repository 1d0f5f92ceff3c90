"""Process-group set-up for torchrun (``torchrun --nproc_per_node=N -m cskd distill CONFIG``).

One process per device. Without torchrun's environment variables everything here degrades to a single process,
so the same engine code runs unchanged on a laptop, one GPU, or many. The tensor gathers the losses use (CKA over
the global batch, CIRKD's memory queues) are here too, so that every collective of cskd lives in one module.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError


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


# ------------------------------------------------------------------------------------------------ tensor gathers


def world_size() -> int:
    """The number of ranks when torch.distributed is initialised, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherSamples(torch.autograd.Function):
    """all_gather along one dimension, differentiable. Backward sums the gradients of all ranks (each rank computes
    the same global loss) and keeps this rank's slice, as ``torch.distributed.nn.functional.all_gather`` does (that
    one is deprecated in recent torch and warns at every call); data-parallel averaging then yields the gradient of
    the global loss."""

    @staticmethod
    def forward(ctx, t: Tensor, dim: int) -> Tensor:  # type: ignore[override]
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        ctx.dim, ctx.rank, ctx.size = dim, dist.get_rank(), t.shape[dim]
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None


def gather_samples(t: Tensor) -> Tensor:
    """The samples (dimension −2 of ``(..., B, D)``) of every rank, concatenated in rank order; differentiable.
    Identity when torch.distributed is not initialised or has one rank. Every rank must hold the same B."""
    if world_size() == 1:
        return t
    return _GatherSamples.apply(t, t.dim() - 2)


@torch.no_grad()
def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order); ``x`` itself without a process group.
    Every rank must pass the same shape (the engine's per-device batch is fixed)."""
    if world_size() == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the processes (one flat all-reduce); a no-op on one process."""
    world = world_size()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistEnv", "all_gather_cat", "all_gather_objects", "all_reduce_gradients", "barrier", "cleanup",
           "gather_samples", "init_distributed", "resolve_device", "world_size"]
