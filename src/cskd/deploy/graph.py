"""Graph rewriting for export: a copy of a segmentor without its training-only parts, whose pyramid poolings
export to ONNX graphs that run at any input size."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import Segmentor
from ..models.heads import PyramidPooling


def _bin_weights(length: int, bins: int, like: Tensor) -> Tensor:
    """bins×length matrix whose row i averages positions ``[⌊i·L/n⌋, ⌈(i+1)·L/n⌉)``: the windows of
    ``adaptive_avg_pool`` (overlapping where ``n`` does not divide ``L``)."""
    pos = torch.arange(length, device=like.device)
    idx = torch.arange(bins, device=like.device)
    start = torch.div(idx * length, bins, rounding_mode="floor")
    end = torch.div((idx + 1) * length + bins - 1, bins, rounding_mode="floor")
    inside = (pos.unsqueeze(0) >= start.unsqueeze(1)) & (pos.unsqueeze(0) < end.unsqueeze(1))
    weights = inside.to(like.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def adaptive_avg_pool2d_portable(x: Tensor, bins: int) -> Tensor:
    """``F.adaptive_avg_pool2d(x, bins)`` as two matrix products whose weights are computed from the input size.

    The ONNX exporter lowers adaptive pooling with bin counts that do not divide the map (PSPNet's 3 and 6 bins on
    a 64×128 map) to index gathers fixed at the example's size, so a graph exported with dynamic H×W fails or
    is wrong at any other size. A window mean is separable (mean over a rectangle = row means of column means),
    so ``P_h · x · P_wᵀ`` with the averaging matrices above is the same pooling at every size."""
    h, w = x.shape[-2], x.shape[-1]
    return _bin_weights(h, bins, x) @ x @ _bin_weights(w, bins, x).transpose(0, 1)


class PortablePyramidPooling(nn.Module):
    """:class:`cskd.models.heads.PyramidPooling` with :func:`adaptive_avg_pool2d_portable`; shares its convs."""

    def __init__(self, source: PyramidPooling) -> None:
        super().__init__()
        self.bins = tuple(source.bins)
        self.convs = nn.ModuleList(getattr(source, f"conv{i}") for i in range(1, len(self.bins) + 1))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        outs = [x]
        for b, conv in zip(self.bins, self.convs, strict=True):
            pooled = conv(adaptive_avg_pool2d_portable(x, b))
            outs.append(F.interpolate(pooled, size, mode="bilinear", align_corners=True))
        return torch.cat(outs, dim=1)


def inference_copy(model: Segmentor, portable: bool = True) -> Segmentor:
    """A copy of ``model`` for export: without the auxiliary head (training only, it would just add weights to
    the file) and, with ``portable``, with pyramid poolings that export to size-independent ONNX. The original
    is untouched."""
    clone = copy.deepcopy(model)
    clone.aux_head = None
    if portable:
        for module in list(clone.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, PyramidPooling):
                    setattr(module, child_name, PortablePyramidPooling(child))
    return clone.eval()


__all__ = ["PortablePyramidPooling", "adaptive_avg_pool2d_portable", "inference_copy"]
