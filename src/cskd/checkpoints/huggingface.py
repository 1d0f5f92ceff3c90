"""Key mapping for the transformer students: CIRKDV2's SegFormer and MobileViT files, and Hugging Face
``transformers`` SegFormer checkpoints, into cskd's ``Segmentor(backbone, head)`` layout.

CIRKDV2's SegFormer and MobileViT files are published layouts: their rules are in :mod:`cskd.checkpoints.official`
(``CIRKD_SEGFORMER_RULES``; for MobileViT ``pretrained.`` → ``backbone.`` and for DeepLabV3 ``head.block.4.`` →
``head.classifier.``), applied by the same loading path as every published checkpoint.

ImageNet files: ``mit_b0.pth`` … is keyed like the encoder (its ``head.*`` classifier is dropped, see
:func:`cskd.models.backbones.mit.mit_imagenet_state_dict`); the mmpretrain MobileViT file is converted by
:func:`cskd.models.backbones.mobilevit.mobilevit_imagenet_state_dict`.

Hugging Face (``SegformerForSemanticSegmentation`` / ``SegformerModel`` / ``SegformerForImageClassification``;
both the hub layout ``segformer.encoder.*`` and the transformers-5 module layout ``segformer.stages.*``), with
stage ``i`` (0-based) → cskd stage ``i+1``:

=====================================================  =============================================
transformers (hub layout)                              cskd
=====================================================  =============================================
``segformer.encoder.patch_embeddings.{i}.proj``         ``backbone.patch_embed{i+1}.proj``
``segformer.encoder.patch_embeddings.{i}.layer_norm``   ``backbone.patch_embed{i+1}.norm``
``segformer.encoder.block.{i}.{j}.layer_norm_1 / _2``   ``backbone.block{i+1}.{j}.norm1 / norm2``
``….attention.self.query``                              ``….attn.q``
``….attention.self.key`` + ``….value``                  ``….attn.kv`` (concatenated, key first)
``….attention.self.sr`` / ``….self.layer_norm``         ``….attn.sr`` / ``….attn.norm``
``….attention.output.dense``                            ``….attn.proj``
``….mlp.dense1`` / ``dwconv.dwconv`` / ``dense2``       ``….mlp.fc1`` / ``dwconv.dwconv`` / ``fc2``
``segformer.encoder.layer_norm.{i}``                    ``backbone.norm{i+1}``
``decode_head.linear_c.{i}.proj``                       ``head.linear_c{i+1}.proj``
``decode_head.linear_fuse.weight`` (no bias)            ``head.linear_fuse.0.weight`` (bias set to 0)
``decode_head.batch_norm.``                             ``head.linear_fuse.1.``
``decode_head.classifier.``                             ``head.classifier.``
``classifier.`` (ImageNet classifier)                   (dropped)
=====================================================  =============================================

transformers' LayerNorms use ε = 1e-5 where the published SegFormer uses 1e-6 (block and stage norms): build the
encoder with ``norm_eps=1e-5`` for exact agreement (:func:`build_hf_segformer` does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .official import unwrap_state_dict

StateDict = dict[str, Tensor]

_MAX_NAMED = 3

# --------------------------------------------------------------------------------------------------- errors


def fit_or_raise(module: nn.Module, state: Mapping[str, Tensor], source: str, hint: str = "") -> None:
    """Raise a one-line :class:`CheckpointError` naming missing / unexpected keys and shape mismatches, if any."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" (+{len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:_MAX_NAMED])}{more}")
    msg = f"{source}: the weights do not fit {type(module).__name__}: " + "; ".join(parts)
    raise CheckpointError(msg + (f"; expected {hint}" if hint else ""))


# ---------------------------------------------------------------------------------------- Hugging Face SegFormer

# transformers-5 module names → hub names (the inverse of transformers' own load-time renaming).
_HF_V5_TO_HUB = (
    (r"\.stages\.(\d+)\.patch_embeddings\.", r".encoder.patch_embeddings.\1."),
    (r"\.stages\.(\d+)\.blocks\.", r".encoder.block.\1."),
    (r"\.stages\.(\d+)\.layer_norm\.", r".encoder.layer_norm.\1."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
)

_HF_BLOCK = (
    ("layer_norm_1.", "norm1."),
    ("layer_norm_2.", "norm2."),
    ("attention.self.query.", "attn.q."),
    ("attention.self.sr.", "attn.sr."),
    ("attention.self.layer_norm.", "attn.norm."),
    ("attention.output.dense.", "attn.proj."),
    ("mlp.dense1.", "mlp.fc1."),
    ("mlp.dense2.", "mlp.fc2."),
    ("mlp.dwconv.dwconv.", "mlp.dwconv.dwconv."),
)


def _with_model_prefix(state: Mapping[str, Tensor]) -> StateDict:
    """A bare ``SegformerModel`` file (``encoder.*`` / ``stages.*``) gets the ``segformer.`` prefix of the task
    models."""
    if any(k.startswith("segformer.") for k in state):
        return dict(state)
    return {("segformer." + k if k.startswith(("encoder.", "stages.")) else k): v for k, v in state.items()}


def is_hf_segformer_layout(state: Mapping[str, Tensor]) -> bool:
    keys = _with_model_prefix(unwrap_state_dict(state))
    return any(k.startswith(("segformer.encoder.", "segformer.stages.")) for k in keys)


def _to_hub_names(state: Mapping[str, Tensor]) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("segformer.") or key.startswith("decode_head."):
            key = "." + key if key.startswith("segformer.") else key
            for pattern, repl in _HF_V5_TO_HUB:
                key = re.sub(pattern, repl, key)
            key = key.lstrip(".")
        out[key] = value
    return out


def from_hf_segformer(state: Mapping[str, Tensor]) -> StateDict:
    """A transformers SegFormer state dict → cskd keys (``backbone.*``, and ``head.*`` when it has a decoder).

    Unknown keys are kept unchanged, so a strict load names them. The ImageNet classifier (``classifier.*``) of an
    encoder-only file is dropped."""
    hub = _to_hub_names(_with_model_prefix(unwrap_state_dict(state)))
    out: StateDict = {}
    kv: dict[str, dict[str, Tensor]] = {}
    for key, value in hub.items():
        m = re.match(r"^segformer\.encoder\.(patch_embeddings|layer_norm)\.(\d+)\.(.*)$", key)
        if m:
            kind, i, rest = m.group(1), int(m.group(2)) + 1, m.group(3)
            if kind == "layer_norm":
                out[f"backbone.norm{i}.{rest}"] = value
            else:
                out[f"backbone.patch_embed{i}.{rest.replace('layer_norm.', 'norm.')}"] = value
            continue
        m = re.match(r"^segformer\.encoder\.block\.(\d+)\.(\d+)\.(.*)$", key)
        if m:
            prefix, rest = f"backbone.block{int(m.group(1)) + 1}.{m.group(2)}.", m.group(3)
            k = re.match(r"^attention\.self\.(key|value)\.(weight|bias)$", rest)
            if k:
                kv.setdefault(f"{prefix}attn.kv.{k.group(2)}", {})[k.group(1)] = value
                continue
            for old, new in _HF_BLOCK:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            else:
                rest = "hf." + rest  # no counterpart: kept (and reported) under a visible name
            out[prefix + rest] = value
            continue
        m = re.match(r"^decode_head\.linear_c\.(\d+)\.(.*)$", key)
        if m:
            out[f"head.linear_c{int(m.group(1)) + 1}.{m.group(2)}"] = value
            continue
        if key == "decode_head.linear_fuse.weight":
            out["head.linear_fuse.0.weight"] = value
            out.setdefault("head.linear_fuse.0.bias", value.new_zeros(value.shape[0]))
            continue
        if key == "decode_head.linear_fuse.bias":
            out["head.linear_fuse.0.bias"] = value
            continue
        if key.startswith("decode_head.batch_norm."):
            out["head.linear_fuse.1." + key[len("decode_head.batch_norm."):]] = value
            continue
        if key.startswith("decode_head.classifier."):
            out["head.classifier." + key[len("decode_head.classifier."):]] = value
            continue
        if key.startswith("classifier."):
            continue
        out[key] = value
    for key, parts in kv.items():
        if set(parts) != {"key", "value"}:
            raise CheckpointError(f"transformers SegFormer file: {key} has only its {'/'.join(parts)} half")
        out[key] = torch.cat([parts["key"], parts["value"]], dim=0)
    return out


def read_state_file(path: str | Path) -> StateDict:
    """A ``.safetensors`` or ``.bin``/``.pth`` state dict, or a ``save_pretrained`` directory (its weights file)."""
    from .files import safe_load
    from .weights import extract_state_dict

    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_state_file(path / name)
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin in the directory")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path}: reading .safetensors needs the 'safetensors' package") from None
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        return dict(load_file(str(path)))
    return extract_state_dict(safe_load(path), str(path))


def hf_segformer_config(state: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Encoder/decoder settings of a converted (cskd-keyed) SegFormer state, read off the weights; ``config``
    (a transformers ``config.json``) supplies what the weights do not tell: heads, strides, patch sizes."""
    config = dict(config or {})
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"^backbone\.patch_embed(\d+)\.", k))})
    if not stages:
        raise CheckpointError("not a SegFormer/MiT state dict: no patch-embedding weights")
    dims = [int(state[f"backbone.patch_embed{i}.proj.weight"].shape[0]) for i in stages]
    depths = [len({k.split(".")[2] for k in state if k.startswith(f"backbone.block{i}.")}) for i in stages]
    srs = []
    ratios = []
    for i in stages:
        sr = state.get(f"backbone.block{i}.0.attn.sr.weight")
        srs.append(int(sr.shape[-1]) if sr is not None else 1)
        ratios.append(state[f"backbone.block{i}.0.mlp.fc1.weight"].shape[0] / dims[i - 1])
    patch = [int(state[f"backbone.patch_embed{i}.proj.weight"].shape[-1]) for i in stages]
    out: dict[str, Any] = {
        "embed_dims": dims,
        "depths": depths,
        "num_heads": list(config.get("num_attention_heads", [1, 2, 5, 8][: len(dims)])),
        "sr_ratios": list(config.get("sr_ratios", srs)),
        "mlp_ratios": list(config.get("mlp_ratios", ratios)),
        "patch_sizes": list(config.get("patch_sizes", patch)),
        "strides": list(config.get("strides", [4] + [2] * (len(dims) - 1))),
        "in_channels": int(config.get("num_channels", state["backbone.patch_embed1.proj.weight"].shape[1])),
    }
    cls = state.get("head.classifier.weight")
    if cls is not None:
        out["decoder_channels"] = int(cls.shape[1])
        out["num_classes"] = int(cls.shape[0])
    return out


def build_hf_segformer(
    source: str | Path | Mapping[str, Tensor], config: Mapping[str, Any] | str | Path | None = None
) -> nn.Module:
    """A cskd ``Segmentor(MixVisionTransformer, SegFormerHead)`` (or the bare encoder, for an encoder-only file
    such as ``nvidia/mit-b0``) with the weights of a transformers SegFormer checkpoint, loaded strictly.

    ``source``: a ``save_pretrained`` directory (its ``config.json`` is read too), a ``.safetensors`` / ``.bin``
    file, or a state dict. ``config``: a ``config.json`` path or its dict, if not beside the weights.
    """
    from ..models.backbones.mit import MixVisionTransformer
    from .heads.segformer import SegFormerHead
    from .segmentor import Segmentor

    name = str(source) if not isinstance(source, Mapping) else "state dict"
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        raw = read_state_file(source)
        cfg_file = Path(source) / "config.json" if Path(source).is_dir() else Path(source).parent / "config.json"
        if config is None and cfg_file.is_file():
            config = cfg_file
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    if not is_hf_segformer_layout(raw):
        some = ", ".join(list(raw)[:_MAX_NAMED])
        raise CheckpointError(f"{name}: not a transformers SegFormer file (no segformer.encoder.* / "
                              f"segformer.stages.* keys; first keys: {some})")
    act = (config or {}).get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{name}: hidden_act {act!r} is not supported; MiT uses 'gelu'")
    state = from_hf_segformer(raw)
    cfg = hf_segformer_config(state, config)
    encoder = MixVisionTransformer(
        cfg["embed_dims"], cfg["depths"], cfg["num_heads"], cfg["sr_ratios"], cfg["mlp_ratios"],
        cfg["patch_sizes"], cfg["strides"], cfg["in_channels"], drop_path_rate=float(
            (config or {}).get("drop_path_rate", 0.1)), norm_eps=1e-5,
    )
    if "num_classes" not in cfg:
        enc_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        enc_state.update(rest)  # reported as unexpected
        fit_or_raise(encoder, enc_state, name)
        encoder.load_state_dict(enc_state)
        return encoder
    head = SegFormerHead(encoder.out_channels, cfg["decoder_channels"], cfg["num_classes"])
    model = Segmentor(encoder, head)
    fit_or_raise(model, state, name)
    model.load_state_dict(state)
    return model


__all__ = ["build_hf_segformer", "fit_or_raise", "from_hf_segformer", "hf_segformer_config", "is_hf_segformer_layout",
           "read_state_file"]
