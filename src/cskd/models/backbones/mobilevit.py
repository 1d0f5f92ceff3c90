"""MobileViT-XXS (Mehta & Rastegari, ICLR 2022) at output stride 8, as CIRKDV2's ``deeplab_mobile`` /
``psp_mobile`` use it.

A 3×3 stem (stride 2), five layers and a 1×1 expansion (80 → 320 channels, ``conv_1x1_exp``). Layers 0-1 are
MobileNetV2 inverted residuals; layers 2-4 are an inverted residual followed by a MobileViT block: a local 3×3 and
1×1 conv, a global representation (2×2 patches unfolded into sequences: pre-norm multi-head self-attention and an
FFN, repeated, then a LayerNorm), a 1×1 projection back and a 3×3 fusion of the block input with it. Layers 3 and 4
keep stride 1 and dilate their depth-wise convs (2, then 4) instead of down-sampling, so the deep maps stay at 1/8.
Activations are SiLU (Swish).

``forward`` returns four stage maps: after layer 1 (1/4, 24 ch), layer 2 (1/8, 48), layer 3 (1/8, 64) and layer 4
with the expansion (1/8, 320): the map the published heads read.

Sub-module names follow the published code (``stem``, ``layers.<i>.<j>``, ``local_rep``, ``global_rep``,
``conv_proj``, ``conv_fusion``, ``conv_1x1_exp``; attention weights ``attn.attn.in_proj_weight`` /
``attn.attn.out_proj``), so CIRKDV2 checkpoints load after the ``pretrained.`` → ``backbone.`` rename. The ImageNet
file (mmpretrain format) is converted by :func:`mobilevit_imagenet_state_dict`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import BackboneDefaults, OptimizerRecipe, register_backbone

NormLayer = Callable[[int], nn.Module]

# Per layer: (kind, out channels, stride, expansion, dilation, transformer width, FFN width, transformer blocks).
_XXS = (
    ("mv2", 16, 1, 2, 1, 0, 0, 1),
    ("mv2", 24, 2, 2, 1, 0, 0, 3),
    ("vit", 48, 2, 2, 1, 64, 128, 2),
    ("vit", 64, 1, 2, 2, 80, 160, 4),
    ("vit", 80, 1, 2, 4, 96, 192, 3),
)


def _conv_norm_act(
    in_ch: int, out_ch: int, k: int, norm_layer: NormLayer | None, act: bool, stride: int = 1, dilation: int = 1,
    groups: int = 1, act_name: str = "activate",
) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    parts: list[tuple[str, nn.Module]] = [
        ("conv", nn.Conv2d(in_ch, out_ch, k, stride, pad, dilation, groups=groups, bias=False))
    ]
    if norm_layer is not None:
        parts.append(("bn", norm_layer(out_ch)))
    if act:
        parts.append((act_name, nn.SiLU()))
    return nn.Sequential(OrderedDict(parts))


class InvertedResidual(nn.Module):
    """1×1 expand (SiLU) → 3×3 depth-wise (SiLU) → 1×1 linear, residual when the shape is kept."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, expand: int, dilation: int, norm_layer: NormLayer
    ) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers = []
        if expand != 1:
            layers.append(_conv_norm_act(in_ch, hidden, 1, norm_layer, True, act_name="activation"))
        layers += [
            _conv_norm_act(hidden, hidden, 3, norm_layer, True, stride, dilation, hidden, act_name="activation"),
            _conv_norm_act(hidden, out_ch, 1, norm_layer, False),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class _SelfAttention(nn.Module):
    """Multi-head self-attention with packed q/k/v weights (``in_proj_weight``/``in_proj_bias``) and ``out_proj``:
    the parameter layout of ``nn.MultiheadAttention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.num_heads, -1).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class _AttentionBranch(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = _SelfAttention(dim, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x)


class _FFN(nn.Module):
    """Linear → SiLU → linear (``layers.0.0`` / ``layers.1``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(0.0)),
                                    nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TransformerLayer(nn.Module):
    """Pre-norm: x + attn(ln1(x)), then x + ffn(ln2(x))."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = _AttentionBranch(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = _FFN(dim, ffn_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class MobileViTBlock(nn.Module):
    """Local conv representation → transformer over unfolded 2×2 patches → 1×1 projection → 3×3 fusion."""

    def __init__(
        self, channels: int, dim: int, ffn_dim: int, depth: int, norm_layer: NormLayer, patch_size: int = 2
    ) -> None:
        super().__init__()
        self.local_rep = nn.Sequential(
            _conv_norm_act(channels, channels, 3, norm_layer, True), _conv_norm_act(channels, dim, 1, None, False)
        )
        self.global_rep = nn.Sequential(*[TransformerLayer(dim, ffn_dim) for _ in range(depth)], nn.LayerNorm(dim))
        self.conv_proj = _conv_norm_act(dim, channels, 1, norm_layer, False)
        self.conv_fusion = _conv_norm_act(2 * channels, channels, 3, norm_layer, True)
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> Tensor:
        y = self.local_rep(x)
        b, c, h, w = y.shape
        p = self.patch_size
        nh, nw = math.ceil(h / p), math.ceil(w / p)
        resized = (nh * p, nw * p) != (h, w)
        if resized:
            y = F.interpolate(y, size=(nh * p, nw * p), mode="bilinear", align_corners=False)
        # B×C×(nh·p)×(nw·p) → (B·p·p)×(nh·nw)×C: one sequence per position inside the patch.
        seq = y.reshape(b, c, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, nh * nw, c)
        seq = self.global_rep(seq)
        y = seq.reshape(b, p, p, nh, nw, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, nh * p, nw * p)
        if resized:
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return self.conv_fusion(torch.cat((x, self.conv_proj(y)), dim=1))


class MobileViT(nn.Module):
    """MobileViT at output stride 8; ``forward`` → four stage maps (see the module docstring)."""

    _stage_layers = (1, 2, 3, 4)

    def __init__(
        self,
        norm_layer: NormLayer = nn.BatchNorm2d,
        pretrained: str | Path | Mapping[str, Tensor] | None = None,
        settings: tuple[tuple[Any, ...], ...] = _XXS,
        stem_channels: int = 16,
        last_expansion: int = 4,
    ) -> None:
        super().__init__()
        self.stem = _conv_norm_act(3, stem_channels, 3, norm_layer, True, stride=2)
        layers = []
        in_ch, red = stem_channels, 2
        reductions, widths = [], []
        for kind, out_ch, stride, expand, dilation, dim, ffn_dim, n in settings:
            if kind == "mv2":
                blocks = [InvertedResidual(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, expand, 1,
                                           norm_layer) for i in range(n)]
            else:
                blocks = [InvertedResidual(in_ch, out_ch, stride, expand, dilation, norm_layer),
                          MobileViTBlock(out_ch, dim, ffn_dim, n, norm_layer)]
            layers.append(nn.Sequential(*blocks))
            in_ch, red = out_ch, red * stride
            reductions.append(red)
            widths.append(out_ch)
        self.layers = nn.Sequential(*layers)
        self.conv_1x1_exp = _conv_norm_act(in_ch, last_expansion * in_ch, 1, norm_layer, True)
        widths[-1] = last_expansion * in_ch
        self.out_channels: tuple[int, ...] = tuple(widths[i] for i in self._stage_layers)
        self.reductions: tuple[int, ...] = tuple(reductions[i] for i in self._stage_layers)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if pretrained is not None:
            load_mobilevit_imagenet(self, pretrained)

    @property
    def output_stride(self) -> int:
        return self.reductions[-1]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == last:
                x = self.conv_1x1_exp(x)
            if i in self._stage_layers:
                outs.append(x)
        return outs


def mobilevit_imagenet_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The mmpretrain ImageNet file (``mobilevit-xxsmall_3rdparty_in1k_20221018-77835605.pth``) → backbone keys.

    Rules (the published code's ``convertstatedict``): drop the ``backbone.`` prefix, drop the classifier
    (``head.*``), rename ``attn.qkv.`` → ``attn.attn.in_proj_`` and ``attn.proj.`` → ``attn.attn.out_proj.``.
    A file already in the backbone's own layout passes through unchanged."""
    from ...checkpoints.official import strip_prefix, unwrap_state_dict

    out = {}
    kept = {k: v for k, v in unwrap_state_dict(state).items() if not k.startswith("head.")}
    for key, value in strip_prefix(kept, "backbone.").items():
        key = key.replace("attn.qkv.", "attn.attn.in_proj_").replace("attn.proj.", "attn.attn.out_proj.")
        out[key] = value
    return out


def load_mobilevit_imagenet(model: MobileViT, path: str | Path | Mapping[str, Tensor]) -> None:
    """Load the ImageNet MobileViT file (mmpretrain format, a ``state_dict`` entry) into ``model`` strictly."""
    from ...checkpoints.files import safe_load
    from ...checkpoints.weights import extract_state_dict
    from ...checkpoints.huggingface import fit_or_raise

    name = str(path) if not isinstance(path, Mapping) else "state dict"
    obj = safe_load(path) if not isinstance(path, Mapping) else path
    state = mobilevit_imagenet_state_dict(extract_state_dict(obj, name))
    fit_or_raise(model, state, name, "the MobileViT-XXS ImageNet file (mobilevit-xxsmall_3rdparty_in1k_*.pth)")
    model.load_state_dict(state)


# Published defaults as CIRKDV2 uses them: DeepLabV3 and PSPNet heads 128 wide, no auxiliary head, and AdamW with
# lr 9e-4 and weight decay 0.01 (CIRKD scripts/train_cirkdv2/cityscapes/deeplabv3_mobilevit_xxs.sh and
# pspnet_mobilevit_xxs.sh; configs/cityscapes/cskd_deeplabv3-r101_*-mvitxxs.yaml).
@register_backbone("mobilevit_xxs", display="MobileViT-XXS", defaults=BackboneDefaults(
    head_channels={"deeplabv3": 128, "pspnet": 128}, aux=False, family="mobilevit",
    optimizer=OptimizerRecipe("adamw", lr=9e-4, weight_decay=0.01,
                              source="CIRKD scripts/train_cirkdv2/cityscapes/deeplabv3_mobilevit_xxs.sh")))
def mobilevit_xxs(
    norm_layer: NormLayer = nn.BatchNorm2d, pretrained: str | Path | Mapping[str, Tensor] | None = None
) -> MobileViT:
    """MobileViT-XXS at output stride 8: stages of 24, 48, 64 and 320 channels at 1/4, 1/8, 1/8, 1/8."""
    return MobileViT(norm_layer, pretrained)


__all__ = ["MobileViT", "MobileViTBlock", "load_mobilevit_imagenet", "mobilevit_imagenet_state_dict",
           "mobilevit_xxs"]
