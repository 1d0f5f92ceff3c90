"""Dilated ("atrous") convolutions computed two other ways: as dense ones on a space-to-batch rearrangement of
their input, or as matrix products over the rows their taps can reach (``row_taps``).

A k×k convolution of dilation d (stride 1, "same" padding d·(k−1)/2) only ever combines pixels whose rows and
columns agree modulo d. Split the input into its d² phases ``x[:, :, a::d, b::d]``, run the *undilated* k×k
convolution (padding (k−1)/2) on all phases as one batch, and interleave the results: the output is exactly the
dilated convolution's (the same products and sums; zero padding to a multiple of d stands for the original zero
padding). This is how DeepLab's reference implementation ran atrous convolution before libraries had dilated
kernels.

Why: a segmentation network at output stride 8 runs its last stages dilated (ResNet layer3 d = 2, layer4 d = 4,
ASPP d = 12/24/36), and a library's dilated kernels may be slower than its dense ones at the same FLOPs. The
rearrangement costs a copy of the input and of the output; under ``torch.compile`` those copies fuse into the
neighbouring element-wise work. Whether it pays is a per-shape measurement (``benchmarks/conv_levers.py``): a
phase map of a few pixels (d = 36 on a 64×128 map) is mostly padding, so the rewrite only applies where every
phase keeps at least ``min_phase`` rows and columns.

Row taps: on a map of H rows, a k×k tap row at vertical offset dy = (ky − (k−1)/2)·d reads padding for |dy| of
the output's rows (every row once |dy| ≥ H). DeepLabV3's ASPP (d = 12, 24, 36 on the 64×128 map of a 512×1024
crop) spends 12.5, 25 and 37.5 % of its FLOPs on such zeros, and the library's kernels for these dilations are
not its fastest (cuDNN on an H200 picks Ampere-generation ones, docs/benchmarks.md §8). Each tap row becomes one
batched matrix product over the input rows it reaches, the input in NHWC as rows of C channels times the row's k
taps' weights side by side (C × k·C_out), and a shift-and-add of the k column taps' outputs into place, which
``torch.compile`` fuses with the bias and what follows. The same products; only the order of the sums changes.
Alone, compiled on an H200, it takes the teacher's three ASPP convolutions from 4.62 to 2.93 ms and the
student's (forward and backward) from 6.07 to 5.49 ms; in the step it first gained nothing, because every
dilated conv had switched class and the teacher's dilated blocks lost their fused epilogues (docs/benchmarks.md
§8). Given the network's input size, it now switches only the convs that take the row-tap path. Opt-in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def space_to_batch_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int, groups: int = 1) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=d·(k−1)//2, dilation=d, groups=groups)`` for an odd square kernel,
    computed on the d² phases of ``x`` as one undilated convolution. The result keeps ``x``'s memory format
    (channels_last in, channels_last out)."""
    n, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    k = weight.shape[-1]
    d = dilation
    hp, wp = -(-h // d) * d, -(-w // d) * d
    if (hp, wp) != (h, w):  # zeros past the end: the original convolution's padding on that side
        x = F.pad(x, (0, wp - w, 0, hp - h))
    hs, ws = hp // d, wp // d
    # NHWC view → (n, a, b, hs, ws, c) phases, copied into channels_last batch order (n·d², c, hs, ws)
    phases = x.permute(0, 2, 3, 1).reshape(n, hs, d, ws, d, c).permute(0, 2, 4, 1, 3, 5)
    phases = phases.reshape(n * d * d, hs, ws, c).permute(0, 3, 1, 2)
    y = F.conv2d(phases, weight, bias, padding=(k - 1) // 2, groups=groups)
    co = y.shape[1]
    # (n·d², co, hs, ws) → NHWC (n, hs, a, ws, b, co) → (n, co, hp, wp) with channels_last strides
    y = y.permute(0, 2, 3, 1).reshape(n, d, d, hs, ws, co).permute(0, 3, 1, 4, 2, 5).reshape(n, hp, wp, co)
    y = y.permute(0, 3, 1, 2)
    if (hp, wp) != (h, w):
        y = y[:, :, :h, :w]
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class SpaceToBatchConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters and state-dict keys) whose dilated forward runs through
    :func:`space_to_batch_conv2d` when every phase map keeps at least ``min_phase`` rows and columns; otherwise,
    and for any input too small for that, the library's dilated kernel."""

    min_phase: int = 8

    def forward(self, x: Tensor) -> Tensor:
        d = self.dilation[0]
        if x.shape[-2] // d >= self.min_phase and x.shape[-1] // d >= self.min_phase:
            return space_to_batch_conv2d(x, self.weight, self.bias, d, self.groups)
        return super().forward(x)


def eligible(conv: nn.Module) -> bool:
    """A square odd kernel > 1, one dilation > 1 on both axes, stride 1, zero "same" padding."""
    if type(conv) is not nn.Conv2d:
        return False
    k, d = conv.kernel_size, conv.dilation
    return (
        k[0] == k[1] and k[0] % 2 == 1 and k[0] > 1 and d[0] == d[1] and d[0] > 1 and conv.stride == (1, 1)
        and conv.padding == (d[0] * (k[0] - 1) // 2,) * 2 and conv.padding_mode == "zeros"
    )


def _switch_dilated_(module: nn.Module, cls: type[nn.Conv2d], grouped: bool,
                     keep: Callable[[nn.Module], bool] = lambda m: True, **attrs: Any) -> int:
    """Every eligible dilated ``nn.Conv2d`` of ``module`` (only one-group ones unless ``grouped``) for which
    ``keep`` holds becomes a ``cls`` in place, with ``attrs`` set; returns how many."""
    count = 0
    for m in module.modules():
        if eligible(m) and (grouped or m.groups == 1) and keep(m):
            m.__class__ = cls
            for name, value in attrs.items():
                setattr(m, name, value)
            count += 1
    return count


def space_to_batch_dilated_(module: nn.Module, min_phase: int = 8) -> int:
    """Switch every eligible dilated ``nn.Conv2d`` of ``module`` to :class:`SpaceToBatchConv2d` in place (the
    parameters stay the same objects; checkpoints are unaffected); returns how many. Works for trained and frozen
    networks alike: the rearrangement is differentiable."""
    return _switch_dilated_(module, SpaceToBatchConv2d, grouped=True, min_phase=min_phase)


def row_taps_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=d·(k−1)//2, dilation=d)`` for an odd square kernel and one group,
    computed tap row by tap row, each over only the input rows it reaches (module docstring). The result keeps
    ``x``'s memory format."""
    n, c, h, w = x.shape
    co, _, k, _ = weight.shape
    d, half = dilation, (k - 1) // 2
    xl = x.permute(0, 2, 3, 1)  # NHWC: a view of a channels_last tensor
    out: Tensor | None = None
    for ky in range(k):
        dy = (ky - half) * d
        rows = h - abs(dy)
        if rows <= 0:  # this tap row only ever reads padding
            continue
        # output row i reads input row i + dy: inputs [max(dy, 0), h + min(dy, 0)) feed outputs [max(-dy, 0), …)
        src = xl[:, max(dy, 0): h + min(dy, 0)].reshape(n, rows * w, c)
        wk = weight[:, :, ky].permute(1, 2, 0).reshape(c, k * co)  # (c, kx·co): the row's taps side by side
        y = torch.bmm(src, wk.expand(n, c, k * co)).view(n, rows, w, k, co)
        part: Tensor | None = None
        for kx in range(k):
            dx = (kx - half) * d
            if abs(dx) >= w:
                continue
            # output column j reads column j + dx of the row product
            tap = F.pad(y[:, :, max(dx, 0): w + min(dx, 0), kx], (0, 0, max(-dx, 0), max(dx, 0)))
            part = tap if part is None else part + tap
        assert part is not None  # the centre column tap always reaches
        part = F.pad(part, (0, 0, 0, 0, max(-dy, 0), max(dy, 0)))
        out = part if out is None else out + part
    assert out is not None  # the centre row always reaches
    if bias is not None:
        out = out + bias
    y_nchw = out.permute(0, 3, 1, 2)
    return y_nchw.contiguous(memory_format=torch.channels_last
                             if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


def row_tap_saving(h: int, k: int, dilation: int) -> float:
    """The share of a k×k convolution's tap-row work over an ``h``-row map that reads only padding."""
    half = (k - 1) // 2
    reached = sum(max(h - abs((ky - half) * dilation), 0) for ky in range(k))
    return 1.0 - reached / (k * h)


class RowTapConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters and state-dict keys) whose dilated forward runs through
    :func:`row_taps_conv2d` when at least ``min_saving`` of its tap-row work would read padding only; otherwise the
    library's dilated kernel."""

    min_saving: float = 0.1

    def forward(self, x: Tensor) -> Tensor:
        if row_tap_saving(x.shape[-2], self.kernel_size[0], self.dilation[0]) >= self.min_saving:
            return row_taps_conv2d(x, self.weight, self.bias, self.dilation[0])
        return super().forward(x)


def dilated_input_heights(module: nn.Module, input_size: tuple[int, int], channels: int = 3) -> dict[nn.Module, int]:
    """The height of the map each eligible dilated conv of ``module`` sees when the network's input is
    ``input_size``: one forward on the meta device (shapes only, no arithmetic, the module's own tensors
    untouched), in eval mode."""
    heights: dict[nn.Module, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: heights.__setitem__(mod, args[0].shape[-2]))
             for m in module.modules() if eligible(m)]
    meta = {name: torch.empty_like(t, device="meta")
            for name, t in [*module.named_parameters(), *module.named_buffers()]}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            torch.func.functional_call(module, meta, (torch.empty(1, channels, *input_size, device="meta"),))
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    return heights


def row_taps_dilated_(module: nn.Module, min_saving: float = 0.1, input_size: tuple[int, int] | None = None) -> int:
    """Switch eligible dilated ``nn.Conv2d`` of ``module`` with one group to :class:`RowTapConv2d` in place
    (parameters and checkpoints unchanged); returns how many. Differentiable: for trained and frozen networks.

    With ``input_size`` (the network's input, H × W), only the convs that would take the row-tap path at that
    size (:func:`dilated_input_heights`); the others stay plain ``nn.Conv2d``, so later rewrites that want plain
    convs still apply to them (a frozen teacher's conv epilogues fused into cuDNN's call, for the dilated blocks
    of ResNet layer3/4). Without it, every eligible conv, each deciding at each call."""
    keep: Callable[[nn.Module], bool] = lambda m: True
    if input_size is not None:
        heights = dilated_input_heights(module, input_size)
        keep = lambda m: m in heights and row_tap_saving(  # noqa: E731
            heights[m], m.kernel_size[0], m.dilation[0]) >= min_saving
    return _switch_dilated_(module, RowTapConv2d, grouped=False, keep=keep, min_saving=min_saving)


__all__ = ["RowTapConv2d", "SpaceToBatchConv2d", "dilated_input_heights", "eligible", "row_tap_saving",
           "row_taps_conv2d", "row_taps_dilated_", "space_to_batch_conv2d", "space_to_batch_dilated_"]
