"""Key mapping between cskd state dicts and those of the published CSKD/CIRKD code, both ways.

The module trees differ only in a few prefixes, so every rule is a prefix rename:

=====================================  ===================================  ==================================
published (github.com/ayoubkarine/CSKD)  cskd                                 where
=====================================  ===================================  ==================================
``pretrained.net.``                      ``backbone.``                         MobileNetV2 models
``pretrained.``                          ``backbone.``                         ResNet models
``auxlayer.``                            ``aux_head.``                         models with an auxiliary head
``head.block.4.``                        ``head.classifier.``                  DeepLabV3 (published: last layer of
                                                                               ``head.block``; cskd: its own module)
``head.conv_last.0.`` / ``.1.``          ``head.fusion.`` / ``head.classifier.``  UperNet (CIRKDV2 ``upernet_lite``)
``patch_embed{i}.`` ``block{i}.``        ``backbone.`` + the same               SegFormer (CIRKDV2 ``segformer``:
``norm{i}.``                                                                   encoder and decoder share one
``linear_c{i}.`` ``linear_fuse.``        ``head.`` + the same                   top-level namespace)
``linear_pred.``                         ``head.classifier.``                  SegFormer
``module.`` (DDP wrapper)                (dropped)                             any file saved from a DDP model
=====================================  ===================================  ==================================

A published file is recognised by its ``pretrained.*`` keys, or (SegFormer) by top-level ``patch_embed1.*`` keys
with a ``linear_pred`` / ``linear_c*`` decoder. :func:`to_cskd_state` also recognises Hugging Face
``transformers`` SegFormer files (:mod:`cskd.checkpoints.huggingface`), so every loading path
(``load_weights``, ``cskd convert``, ``--teacher-weights``, ``model.weights``) takes all three.

The published model names are ``deeplabv3`` / ``psp`` (ResNet backbones), ``deeplab_mobile`` / ``psp_mobile``
(MobileNetV2), and in CIRKDV2 ``deeplabv3_mobilenet_ssseg`` / ``psp_mobile`` (MobileNetV3, whose backbone has no
``net.`` wrapper) and ``upernet_lite`` (UperNet-R18, FPN width 128; ``upernet`` for the wider ResNets), ``deeplab_mobile`` /
``psp_mobile`` on MobileViT-XXS and ``segformer`` (MiT-B0…B5). ImageNet backbone files (``resnet18-imagenet.pth``, ``mobilenetv2-imagenet.pth``, ...) are keyed like
the backbone module itself; :func:`backbone_state_dict` strips any wrapper prefix and drops an ImageNet classifier.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

StateDict = dict[str, Tensor]


def official_model_name(model: str, backbone: str) -> str:
    """The published code's ``--student-model``/``--teacher-model`` name for a cskd (model, backbone) pair."""
    if backbone.startswith("timm:"):
        raise ValueError(f"no published counterpart for backbone {backbone!r}")
    mobile = backbone.startswith(("mobilenet", "mobilevit"))
    if model == "segformer" and backbone.startswith("mit_"):
        return "segformer"
    if model == "deeplabv3":
        if backbone.startswith("mobilenetv3"):
            return "deeplabv3_mobilenet_ssseg"
        return "deeplab_mobile" if mobile else "deeplabv3"
    if model == "pspnet":
        return "psp_mobile" if mobile else "psp"
    if model == "upernet" and backbone.startswith("resnet"):
        return "upernet_lite" if backbone == "resnet18" else "upernet"
    raise ValueError(f"no published counterpart for model {model!r} on backbone {backbone!r}")


_SEGFORMER_STAGES = 4

CIRKD_SEGFORMER_RULES: tuple[tuple[str, str], ...] = (
    *((f"{part}{i}.", f"backbone.{part}{i}.") for i in range(1, _SEGFORMER_STAGES + 1)
      for part in ("patch_embed", "block", "norm")),
    *((f"linear_c{i}.", f"head.linear_c{i}.") for i in range(1, _SEGFORMER_STAGES + 1)),
    ("linear_fuse.", "head.linear_fuse."),
    ("linear_pred.", "head.classifier."),
)
"""(published prefix, cskd prefix) for CIRKDV2's ``segformer`` model (MiT encoder + all-MLP decoder)."""


def _rules(model: str, backbone: str) -> list[tuple[str, str]]:
    """(published prefix, cskd prefix), most specific first."""
    if model == "segformer":
        return list(CIRKD_SEGFORMER_RULES)
    wrapped = backbone == "mobilenetv2"  # the published MobileNetV2 sits under ``net.``; MobileNetV3 does not
    rules = [("pretrained.net.", "backbone.")] if wrapped else [("pretrained.", "backbone.")]
    rules.append(("auxlayer.", "aux_head."))
    if model == "deeplabv3":
        rules.append(("head.block.4.", "head.classifier."))
    if model == "upernet":
        rules += [("head.conv_last.0.", "head.fusion."), ("head.conv_last.1.", "head.classifier.")]
    return rules


def _rename(state: Mapping[str, Tensor], pairs: list[tuple[str, str]]) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def strip_prefix(state: Mapping[str, Tensor], prefix: str = "module.") -> StateDict:
    """Drop a wrapper prefix (``module.`` from DDP, ``_orig_mod.`` from torch.compile) where every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def unwrap_state_dict(state: Mapping[str, Tensor]) -> StateDict:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) wrapper prefixes."""
    out = dict(state)
    for prefix in ("module.", "_orig_mod."):
        out = strip_prefix(out, prefix)
    return out


def is_cirkd_segformer_layout(state: Mapping[str, Tensor]) -> bool:
    """True for CIRKDV2's SegFormer: the MiT encoder at the top level (``patch_embed1.*``) and its decoder."""
    keys = unwrap_state_dict(state)
    return "patch_embed1.proj.weight" in keys and any(k.startswith(("linear_pred.", "linear_c")) for k in keys)


def is_official_layout(state: Mapping[str, Tensor]) -> bool:
    """True if the keys follow the published code's module tree (``pretrained.*``, or CIRKDV2's SegFormer)."""
    keys = unwrap_state_dict(state)
    return any(k.startswith("pretrained.") for k in keys) or is_cirkd_segformer_layout(keys)


def to_cskd_state(state: Mapping[str, Tensor], model: str, backbone: str) -> StateDict:
    """Any supported segmentor layout → cskd keys: published CSKD/CIRKD/CIRKDV2 (converted with the rules of
    ``model``/``backbone``), Hugging Face ``transformers`` SegFormer, or cskd's own (wrappers dropped)."""
    from .huggingface import from_hf_segformer, is_hf_segformer_layout

    if is_hf_segformer_layout(state):
        return from_hf_segformer(state)
    if is_official_layout(state):
        return from_official(state, model, backbone)
    return unwrap_state_dict(state)


def from_official(state: Mapping[str, Tensor], model: str, backbone: str) -> StateDict:
    """Published segmentor state dict → cskd keys (``model`` is cskd's name: ``deeplabv3`` or ``pspnet``)."""
    return _rename(unwrap_state_dict(state), _rules(model, backbone))


def to_official(state: Mapping[str, Tensor], model: str, backbone: str) -> StateDict:
    """cskd segmentor state dict → the published code's keys (loadable by its ``get_segmentation_model``)."""
    return _rename(unwrap_state_dict(state), [(new, old) for old, new in _rules(model, backbone)])


_IMAGENET_CLASSIFIERS = ("fc.", "classifier.", "head.")


def backbone_state_dict(state: Mapping[str, Tensor]) -> StateDict:
    """An ImageNet backbone file, or any segmentor file (published or cskd) → keys of cskd's backbone module.

    From a segmentor file only the backbone entries (``pretrained.*`` / ``backbone.*``) are kept. The published
    MobileNetV2 wrapper prefix ``net.`` is stripped, and an ImageNet classifier (``fc.*``, ``classifier.*``,
    ``head.*`` as in ``mit_b0.pth``) is dropped since the segmentation backbones have none.
    """
    out = unwrap_state_dict(state)
    from .huggingface import from_hf_segformer, is_hf_segformer_layout

    if is_hf_segformer_layout(out):  # a transformers SegFormer / MiT file
        out = from_hf_segformer(out)
    elif is_cirkd_segformer_layout(out):  # CIRKDV2's SegFormer: encoder keys at the top level
        out = _rename(out, list(CIRKD_SEGFORMER_RULES))
    for prefix in ("pretrained.", "backbone."):
        if any(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
            break
    out = strip_prefix(out, "net.")
    return {k: v for k, v in out.items() if not k.startswith(_IMAGENET_CLASSIFIERS)}


__all__ = ["CIRKD_SEGFORMER_RULES", "backbone_state_dict", "from_official", "is_cirkd_segformer_layout",
           "is_official_layout", "official_model_name", "strip_prefix", "to_cskd_state", "to_official",
           "unwrap_state_dict"]
