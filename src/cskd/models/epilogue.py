"""A frozen network's convolution epilogues (bias, residual add, ReLU) inside cuDNN's convolution call.

After :func:`~cskd.models.fusion.fold_batchnorm_`, a frozen ResNet is conv(+bias) → ReLU and, at each block's end,
conv(+bias) + identity → ReLU. Compiled, each epilogue is one elementwise kernel that reads the convolution's whole
output back (and the identity) and writes it again: in a DeepLabV3-R101 teacher at 512×1024 the block ends alone
took 2.9 ms of a 42 ms distillation step on an H200 (docs/benchmarks.md §8). cuDNN applies the same epilogue while
the convolution's tile is still in registers (``torch.cudnn_convolution_relu`` / ``_add_relu``, the kernels that
PyTorch's frozen-graph fusion uses for inference).

On CUDA the blocks call those two ATen ops directly. ATen has no shape function for them, so this module
registers one (:func:`_fused_conv_fake`), and ``torch.compile`` keeps each as one call to the ATen op. (Wrapped
in a Python custom op instead, the same kernels gave the same CSKD step time on an H200: 41.5 ms p50 either way.)
On other devices the blocks run the plain ops.
Forward only: for frozen (no-grad) networks such as the teacher. The fused result equals the unfused one up to
rounding (the epilogue adds in float32 before rounding to bfloat16, where the unfused path rounds the
convolution's output first).
"""

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._prims_common import suggest_memory_format

from .backbones.resnet import BasicBlock, Bottleneck, ResNetV1s
from .fusion import fold_batchnorm_


def _fused_conv_fake(x: Tensor, weight: Tensor, *args: Any) -> Tensor:
    """Shape and strides of cuDNN's fused-conv output: its size, in the memory format cuDNN picks (channels-last
    when the input or the weight is channels-last, and never for float64; ``cudnn_conv_suggest_memory_format``)."""
    *_, stride, padding, dilation, _groups = args
    size = [x.shape[0], weight.shape[0]]
    for i in range(2):
        k = weight.shape[2 + i]
        size.append((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1)
    channels_last = torch.float64 not in (x.dtype, weight.dtype) and weight.dim() == 4 and torch.channels_last in (
        suggest_memory_format(x), suggest_memory_format(weight))
    return torch.empty(size, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _register_fakes() -> None:
    for op in (torch.ops.aten.cudnn_convolution_relu.default, torch.ops.aten.cudnn_convolution_add_relu.default):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"):  # a later PyTorch may ship one
            torch.library.register_fake(op)(_fused_conv_fake)


_register_fakes()


def conv2d_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> Tensor:
    """``relu(conv2d(x, weight, bias))``, in one cuDNN call on CUDA."""
    if x.is_cuda:
        return torch.ops.aten.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))


def conv2d_add_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor, stride: list[int],
                    padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """``relu(conv2d(x, weight, bias) + residual)``, in one cuDNN call on CUDA."""
    if x.is_cuda:
        return torch.ops.aten.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation,
                                                         groups)
    return F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)


def _conv_args(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups  # type: ignore[arg-type]


def _fusable(conv: nn.Module) -> bool:
    """A plain zero-padded conv (cuDNN's fused call has no other padding mode)."""
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


class ConvReLU(nn.Conv2d):
    """A conv that applies the ReLU after it in the same call. Made in place from an ``nn.Conv2d`` by
    :func:`fuse_conv_epilogues_` (its class changes, its parameters and their names do not); the ReLU module that
    followed becomes an ``nn.Identity``."""

    def forward(self, x: Tensor) -> Tensor:
        return conv2d_relu(x.to(self.weight.dtype), self.weight, self.bias, *_conv_args(self))


def _relu_fused(conv: nn.Conv2d) -> nn.Conv2d:
    conv.__class__ = ConvReLU
    return conv


def _conv_add_relu(conv: nn.Conv2d, x: Tensor, residual: Tensor) -> Tensor:
    w = conv.weight
    return conv2d_add_relu(x.to(w.dtype), w, conv.bias, residual.to(w.dtype), *_conv_args(conv))


class FusedBottleneck(Bottleneck):
    """A BN-folded :class:`Bottleneck` whose convs carry their epilogues (made by :func:`fuse_conv_epilogues_`)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv1(x)  # ConvReLU
        out = self.conv2(out)  # ConvReLU
        return _conv_add_relu(self.conv3, out, identity)


class FusedBasicBlock(BasicBlock):
    """A BN-folded :class:`BasicBlock` whose convs carry their epilogues (made by :func:`fuse_conv_epilogues_`)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return _conv_add_relu(self.conv2, self.conv1(x), identity)


def _folded(*mods: nn.Module) -> bool:
    return all(isinstance(m, nn.Identity) for m in mods)


def _fuse_block(block: nn.Module) -> bool:
    if type(block) is Bottleneck:
        if not (_folded(block.bn1, block.bn2, block.bn3) and all(map(_fusable, (block.conv1, block.conv2, block.conv3)))):
            return False
        _relu_fused(block.conv1), _relu_fused(block.conv2)
        block.__class__ = FusedBottleneck
        return True
    if type(block) is BasicBlock:
        if not (_folded(block.bn1, block.bn2) and _fusable(block.conv1) and _fusable(block.conv2)):
            return False
        _relu_fused(block.conv1)
        block.__class__ = FusedBasicBlock
        return True
    return False


def fuse_conv_epilogues_(module: nn.Module) -> int:
    """In place, for a frozen network whose BatchNorms :func:`~cskd.models.fusion.fold_batchnorm_` has folded: every
    ResNet block becomes its fused twin, and every conv → (folded BN) → ReLU in an ``nn.Sequential`` (the heads'
    conv-BN-ReLU) or in the ResNet stem becomes one :class:`ConvReLU`. Returns the number of convs whose epilogue
    moved into the conv. Module names and parameters are unchanged; forward only."""
    if module.training:
        raise ValueError("fuse_conv_epilogues_ is for frozen networks in eval mode (fold their BatchNorms first)")
    count = 0
    for parent in list(module.modules()):
        if _fuse_block(parent):
            count += 3 if isinstance(parent, FusedBottleneck) else 2
            continue
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for i, name in enumerate(names):
                conv = parent._modules[name]
                if not _fusable(conv):
                    continue
                j = i + 1
                while j < len(names) and isinstance(parent._modules[names[j]], nn.Identity):
                    j += 1
                if j < len(names) and type(parent._modules[names[j]]) is nn.ReLU:
                    _relu_fused(conv)  # type: ignore[arg-type]
                    parent._modules[names[j]] = nn.Identity()
                    count += 1
        if isinstance(parent, ResNetV1s):
            for n in (1, 2, 3):
                conv, bn, relu = (getattr(parent, f"{p}{n}") for p in ("conv", "bn", "relu"))
                if _fusable(conv) and _folded(bn) and type(relu) is nn.ReLU:
                    _relu_fused(conv)
                    setattr(parent, f"relu{n}", nn.Identity())
                    count += 1
    return count


def frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` for inference only, as the frozen teacher runs: eval mode, no gradients, its BatchNorms
    folded into their convs, the conv epilogues in cuDNN's call (on CUDA; the plain ops elsewhere), parameters in
    ``dtype`` (the autocast dtype: no conv re-casts its weight at each call). ``model`` itself is left as it is."""
    net = copy.deepcopy(model).eval().requires_grad_(False)
    fold_batchnorm_(net)
    fuse_conv_epilogues_(net)
    return net if dtype is None else net.to(dtype=dtype)


__all__ = ["ConvReLU", "FusedBasicBlock", "FusedBottleneck", "conv2d_add_relu", "conv2d_relu", "frozen_copy",
           "fuse_conv_epilogues_"]
