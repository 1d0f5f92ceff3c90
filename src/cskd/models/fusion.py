"""Fold inference-mode BatchNorm into the convolution before it, for frozen networks (the teacher).

A BatchNorm with frozen statistics is a per-channel affine map, so conv → BN is one conv with rescaled weights
and a bias: exact up to rounding (the fold is computed in float64), and it removes one full read and write of
every activation the BN touched. In a distillation step the frozen teacher's BNs are most of its non-conv time.
"""

from __future__ import annotations

import torch
from torch import nn


def _fold(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    w = conv.weight.detach().double()
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    shift = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(scale)
    new_bias = (bias - bn.running_mean.double()) * scale + shift
    conv.weight = nn.Parameter((w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm)
        and bn.track_running_stats
        and conv.out_channels == bn.num_features
    )


def fold_batchnorm_(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a conv (adjacent in an ``nn.Sequential``, or ``convN`` → ``bnN``
    attribute pairs as in ResNet blocks) into that conv, replacing the BN by ``nn.Identity``. In place; returns the
    number of folds. Only for modules kept in eval mode: the folded network no longer normalises by batch
    statistics."""
    if module.training:
        raise ValueError("fold_batchnorm_ needs a module in eval mode (the fold uses the running statistics)")
    count = 0
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                if _foldable(parent._modules[a], parent._modules[b]):
                    _fold(parent._modules[a], parent._modules[b])  # type: ignore[arg-type]
                    parent._modules[b] = nn.Identity()
                    count += 1
        for name, child in list(parent.named_children()):
            if name.startswith("conv") and name[4:].isdigit():
                bn_name = "bn" + name[4:]
                bn = getattr(parent, bn_name, None)
                if bn is not None and _foldable(child, bn):
                    _fold(child, bn)  # type: ignore[arg-type]
                    setattr(parent, bn_name, nn.Identity())
                    count += 1
    return count


__all__ = ["fold_batchnorm_"]
