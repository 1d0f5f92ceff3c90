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
``module.`` (DDP wrapper)                (dropped)                             any file saved from a DDP model
=====================================  ===================================  ==================================

The published model names are ``deeplabv3`` / ``psp`` (ResNet backbones), ``deeplab_mobile`` / ``psp_mobile``
(MobileNetV2), and in CIRKDV2 ``deeplabv3_mobilenet_ssseg`` / ``psp_mobile`` (MobileNetV3, whose backbone has no
``net.`` wrapper) and ``upernet_lite`` (UperNet-R18, FPN width 128; ``upernet`` for the wider ResNets). ImageNet backbone files (``resnet18-imagenet.pth``, ``mobilenetv2-imagenet.pth``, ...) are keyed like
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
    mobile = backbone.startswith("mobilenet")
    if model == "deeplabv3":
        if backbone.startswith("mobilenetv3"):
            return "deeplabv3_mobilenet_ssseg"
        return "deeplab_mobile" if mobile else "deeplabv3"
    if model == "pspnet":
        return "psp_mobile" if mobile else "psp"
    if model == "upernet" and backbone.startswith("resnet"):
        return "upernet_lite" if backbone == "resnet18" else "upernet"
    raise ValueError(f"no published counterpart for model {model!r} on backbone {backbone!r}")


def _rules(model: str, backbone: str) -> list[tuple[str, str]]:
    """(published prefix, cskd prefix), most specific first."""
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


def is_official_layout(state: Mapping[str, Tensor]) -> bool:
    """True if the keys follow the published code's module tree (``pretrained.*``)."""
    return any(k.startswith("pretrained.") for k in unwrap_state_dict(state))


def from_official(state: Mapping[str, Tensor], model: str, backbone: str) -> StateDict:
    """Published segmentor state dict → cskd keys (``model`` is cskd's name: ``deeplabv3`` or ``pspnet``)."""
    return _rename(unwrap_state_dict(state), _rules(model, backbone))


def to_official(state: Mapping[str, Tensor], model: str, backbone: str) -> StateDict:
    """cskd segmentor state dict → the published code's keys (loadable by its ``get_segmentation_model``)."""
    return _rename(unwrap_state_dict(state), [(new, old) for old, new in _rules(model, backbone)])


_IMAGENET_CLASSIFIERS = ("fc.", "classifier.")


def backbone_state_dict(state: Mapping[str, Tensor]) -> StateDict:
    """An ImageNet backbone file, or any segmentor file (published or cskd) → keys of cskd's backbone module.

    From a segmentor file only the backbone entries (``pretrained.*`` / ``backbone.*``) are kept. The published
    MobileNetV2 wrapper prefix ``net.`` is stripped, and an ImageNet classifier (``fc.*``, ``classifier.*``)
    is dropped since the dilated backbones have none.
    """
    out = unwrap_state_dict(state)
    for prefix in ("pretrained.", "backbone."):
        if any(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
            break
    out = strip_prefix(out, "net.")
    return {k: v for k, v in out.items() if not k.startswith(_IMAGENET_CLASSIFIERS)}


__all__ = ["backbone_state_dict", "from_official", "is_official_layout", "official_model_name", "strip_prefix",
           "to_official",
           "unwrap_state_dict"]
