"""Mix Transformer (MiT-B0 … B5), the SegFormer encoder (Xie et al., NeurIPS 2021).

Four stages, each an overlapping patch embedding (a strided convolution wider than its stride, then LayerNorm), a
stack of transformer blocks and a LayerNorm. A block is pre-norm efficient self-attention, whose keys and values
come from a map shrunk by a strided convolution (``sr``, ratio 8/4/2/1), plus a Mix-FFN (linear → 3×3 depth-wise
conv → GELU → linear), each on a residual branch with stochastic depth (identity in eval mode).

Stage maps are at 1/4, 1/8, 1/16 and 1/32 of the input. Sub-module names (``patch_embed{i}``, ``block{i}``,
``norm{i}``, ``attn.q``/``attn.kv``/``attn.sr``, ``mlp.dwconv.dwconv``) are those of the ImageNet files
(``mit_b0.pth`` …) and of CIRKDV2's SegFormer checkpoints, so those load by prefix alone
(:mod:`cskd.checkpoints.huggingface`).

LayerNorm is the model's own normalisation and stays LayerNorm; ``norm_layer`` (the BatchNorm-like factory of the
backbone contract) is accepted for a uniform signature and unused, since the encoder has no BatchNorm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import BackboneDefaults, OptimizerRecipe, register_backbone

NormLayer = Callable[[int], nn.Module]

# Published per-variant settings (embed dims, depths); heads 1/2/5/8, sr ratios 8/4/2/1 and MLP ratio 4 throughout.
_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}


# The published SegFormer student recipe: AdamW, lr 2e-4 and the trainer's default weight decay 1e-4 (CIRKD
# scripts/train_cirkdv2/cityscapes/segformer_b0.sh; configs/cityscapes/cskd_segformer-mitb4_segformer-mitb0.yaml).
# It is the one published MiT training script, so every MiT variant gets it.
_MIT_OPTIMIZER = OptimizerRecipe("adamw", lr=2e-4, weight_decay=1e-4,
                                 source="CIRKD scripts/train_cirkdv2/cityscapes/segformer_b0.sh")


def _defaults(name: str) -> BackboneDefaults:
    """Published defaults as CIRKDV2's SegFormer uses them: an all-MLP decoder 256 wide on B0/B1 and 768 wide on
    B2-B5, no auxiliary head, AdamW. No DeepLabV3/PSPNet head is published on MiT: those use the heads' own
    widths."""
    return BackboneDefaults(head_channels={"segformer": 256 if name in ("mit_b0", "mit_b1") else 768}, aux=False,
                            family="mit", optimizer=_MIT_OPTIMIZER)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``p`` (rescaled); identity in eval."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def _tokens_to_map(x: Tensor, h: int, w: int) -> Tensor:
    """B×(h·w)×C tokens → B×C×h×w."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class OverlapPatchEmbed(nn.Module):
    """Strided conv with kernel > stride (patches overlap), then LayerNorm over channels; returns tokens and size."""

    def __init__(self, in_ch: int, dim: int, kernel: int, stride: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from the map reduced ``sr_ratio``× by a strided conv."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MiT: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).view(b, n, heads, c // heads).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            src = self.norm(self.sr(_tokens_to_map(x, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(src).view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """3×3 depth-wise conv applied to a token sequence laid out as an h×w map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.dwconv(_tokens_to_map(x, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Linear → depth-wise 3×3 conv (positional information without position embeddings) → GELU → linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), both with stochastic depth."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path_rate: float, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x), h, w), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x), h, w), self.drop_path_rate, self.training)


class MixVisionTransformer(nn.Module):
    """``forward`` returns the four stage maps (B×C×H/4×W/4 … B×C×H/32×W/32, channels ``embed_dims``).

    ``norm_eps`` is the epsilon of the block and stage LayerNorms: 1e-6 in the published SegFormer/CIRKD code,
    1e-5 in Hugging Face ``transformers`` (the converter builds with that); patch-embedding and reduction norms use
    1e-5 in both.
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        in_channels: int = 3,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-6,
        norm_layer: NormLayer | None = None,
        pretrained: str | Path | Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        del norm_layer  # no BatchNorm in the encoder (see the module docstring)
        settings = (embed_dims, depths, num_heads, sr_ratios, mlp_ratios, patch_sizes, strides)
        if len({len(s) for s in settings}) != 1:
            raise ValueError(f"MiT: per-stage settings differ in length: {[len(s) for s in settings]}")
        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        # Registered as published (all patch embeddings, then block/norm per stage): state dicts list the same order.
        prev, red = in_channels, 1
        reductions = []
        for i, (dim, k, s) in enumerate(zip(embed_dims, patch_sizes, strides), start=1):
            self.add_module(f"patch_embed{i}", OverlapPatchEmbed(prev, dim, k, s))
            prev, red = dim, red * s
            reductions.append(red)
        cur = 0
        for i, (dim, depth, heads, sr, ratio) in enumerate(zip(*settings[:5]), start=1):
            blocks = [MiTBlock(dim, heads, ratio, sr, rates[cur + j], norm_eps) for j in range(depth)]
            self.add_module(f"block{i}", nn.ModuleList(blocks))
            self.add_module(f"norm{i}", nn.LayerNorm(dim, eps=norm_eps))
            cur += depth
        self.num_stages = len(embed_dims)
        self.out_channels: tuple[int, ...] = tuple(int(d) for d in embed_dims)
        self.reductions: tuple[int, ...] = tuple(reductions)
        self._init_weights()
        if pretrained is not None:
            load_mit_imagenet(self, pretrained)

    @property
    def output_stride(self) -> int:
        return self.reductions[-1]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(1, self.num_stages + 1):
            tokens, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                tokens = blk(tokens, h, w)
            x = _tokens_to_map(getattr(self, f"norm{i}")(tokens), h, w).contiguous()
            outs.append(x)
        return outs


def mit_imagenet_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An ImageNet MiT file (``mit_b0.pth`` …: encoder keys plus a 1000-class ``head.*``) → encoder keys.

    Wrapper prefixes (``module.``, ``backbone.``) are stripped and the classifier is dropped; so is the decoder of
    a segmentor file (cskd's ``head.*``, CIRKDV2's ``linear_c*`` / ``linear_fuse`` / ``linear_pred``), which makes
    those usable as encoder initialisation too."""
    from ...checkpoints.official import strip_prefix, unwrap_state_dict

    decoder = ("head.", "linear_c", "linear_fuse.", "linear_pred.")
    kept = {k: v for k, v in unwrap_state_dict(state).items() if not k.startswith(decoder)}
    return strip_prefix(kept, "backbone.")


def load_mit_imagenet(model: MixVisionTransformer, path: str | Path | Mapping[str, Tensor]) -> None:
    """Load an ImageNet MiT file into ``model`` strictly (every encoder tensor must come from the file).

    Also takes a transformers file (``nvidia/mit-b0``'s ``model.safetensors`` / ``pytorch_model.bin``, or a
    ``save_pretrained`` directory), detected by its layout; its encoder is used."""
    from ...checkpoints.files import safe_load
    from ...checkpoints.weights import extract_state_dict
    from ...checkpoints.huggingface import fit_or_raise, from_hf_segformer, is_hf_segformer_layout, read_state_file

    name = str(path) if not isinstance(path, Mapping) else "state dict"
    if isinstance(path, Mapping):
        raw = extract_state_dict(path, name)
    elif Path(path).is_dir() or Path(path).suffix == ".safetensors":
        raw = read_state_file(path)
    else:
        raw = extract_state_dict(safe_load(path), name)
    if is_hf_segformer_layout(raw):
        raw = {k: v for k, v in from_hf_segformer(raw).items() if k.startswith("backbone.")}
    state = mit_imagenet_state_dict(raw)
    fit_or_raise(model, state, name, "an MiT ImageNet file of the same variant (e.g. mit_b0.pth for mit_b0)")
    model.load_state_dict(state)


def _factory(name: str) -> Callable[..., MixVisionTransformer]:
    dims, depths = _VARIANTS[name]

    @register_backbone(name, defaults=_defaults(name), display="MiT-" + name[len("mit_"):].upper())
    def build(
        norm_layer: NormLayer | None = None,
        pretrained: str | Path | Mapping[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> MixVisionTransformer:
        return MixVisionTransformer(dims, depths, norm_layer=norm_layer, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"MiT-{name[-2:].upper()}: widths {dims}, depths {depths}; stage maps at 1/4 … 1/32."
    return build


mit_b0 = _factory("mit_b0")
mit_b1 = _factory("mit_b1")
mit_b2 = _factory("mit_b2")
mit_b3 = _factory("mit_b3")
mit_b4 = _factory("mit_b4")
mit_b5 = _factory("mit_b5")

__all__ = ["MiTBlock", "MixVisionTransformer", "load_mit_imagenet", "mit_b0", "mit_b1", "mit_b2",
           "mit_b3", "mit_b4", "mit_b5", "mit_imagenet_state_dict"]
