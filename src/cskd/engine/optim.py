"""The optimiser named by ``train.optimizer``: SGD (the published CNN recipe) or AdamW (the published MobileViT and
SegFormer recipes), with weight decay left off norms, biases and position terms where ``train.no_decay_norm_bias``
says so (default: for AdamW yes, for SGD no, as in the published SGD recipes, which decay every parameter)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

# Name fragments of position terms (ViT / SegFormer / MobileViT position embeddings and PVT-style position convs).
POSITION_TERMS = ("pos_embed", "position", "pos_block", "absolute_pos", "relative_position", "cls_token", "rel_pos")


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights (every 0-/1-D parameter) and position terms."""
    return param.ndim <= 1 or any(t in name for t in POSITION_TERMS)


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, split: bool) -> list[dict]:
    params = [(n, p) for n, p in named if p.requires_grad]
    if not split:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decay = [p for n, p in params if not is_no_decay(n, p)]
    no_decay = [p for n, p in params if is_no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    module: nn.Module, train: object, fused: bool, exclude: Callable[[nn.Parameter], bool] | None = None
) -> torch.optim.Optimizer:
    """``train`` is the ``TrainConfig``: ``optimizer``, ``lr``, ``weight_decay``, ``momentum`` (SGD), ``betas``
    and ``eps`` (AdamW), ``no_decay_norm_bias``. Parameters for which ``exclude`` is true (those a loss's own
    optimiser trains, e.g. a discriminator's) are left out."""
    kind = getattr(train, "optimizer", "sgd")
    split = getattr(train, "no_decay_norm_bias", None)
    if split is None:
        split = kind == "adamw"
    named = [(n, p) for n, p in module.named_parameters() if exclude is None or not exclude(p)]
    groups = param_groups(named, train.weight_decay, split)  # type: ignore[attr-defined]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum,  # type: ignore[attr-defined]
                               weight_decay=train.weight_decay, fused=fused)  # type: ignore[attr-defined]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas),  # type: ignore[attr-defined]
                                 eps=train.eps, weight_decay=train.weight_decay, fused=fused)  # type: ignore
    raise ValueError(f"unknown train.optimizer {kind!r}; choose one of ['adamw', 'sgd']")


__all__ = ["POSITION_TERMS", "build_optimizer", "is_no_decay", "param_groups"]
