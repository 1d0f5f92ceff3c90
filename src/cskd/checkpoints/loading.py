"""Loading a segmentor from any checkpoint kind: a cskd checkpoint (rebuilt from its ``spec``) or a bare /
published state dict described by the caller."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.segmentor import MODELS, Segmentor, build_from_spec, build_segmentor, canonical_model_name
from .files import safe_load
from .official import to_cskd_state
from .weights import extract_state_dict, load_weights


@dataclass
class LoadedModel:
    model: Segmentor
    path: Path
    dataset: dict[str, Any] | None
    """The checkpoint's ``dataset`` entry (name, num_classes, class_names, palette), if it has one."""
    config: dict[str, Any] | None
    """The resolved experiment config a cskd checkpoint was trained with."""

    @property
    def label(self) -> str:
        spec = self.model.spec
        return f"{spec.model}/{spec.backbone}" if spec else self.path.stem


def load_model(
    path: str | Path,
    *,
    model: str | None = None,
    backbone: str | None = None,
    num_classes: int | None = None,
    flag_prefix: str = "",
) -> LoadedModel:
    """A segmentor with the weights of ``path``: a cskd checkpoint (rebuilt from its ``spec``) or a bare /
    published state dict (described by ``model`` / ``backbone``; classes and aux head are read off the weights)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":  # a transformers file or save_pretrained directory
        from .huggingface import read_state_file

        obj: Any = read_state_file(path)
    else:
        obj = safe_load(path)
    ckpt = obj if isinstance(obj, Mapping) else {}
    spec = ckpt.get("spec")
    if isinstance(spec, Mapping):
        asked = {"model": canonical_model_name(model) if model else None, "backbone": backbone,
                 "num_classes": num_classes}
        clash = {k: v for k, v in asked.items() if v is not None and str(v) != str(spec.get(k))}
        if clash:
            raise ConfigError(
                f"{path}: the checkpoint describes its model ({dict(spec)}); drop the conflicting "
                + ", ".join(f"--{flag_prefix}{k.replace('_', '-')} {v}" for k, v in clash.items())
            )
        net = build_from_spec(dict(spec))
    else:
        if model is None or backbone is None:
            raise ConfigError(
                f"{path}: a bare or published state dict does not say which network it is; pass "
                f"--{flag_prefix}model ({'/'.join(MODELS)}) and --{flag_prefix}backbone"
            )
        state = extract_state_dict(obj, str(path))
        try:
            state = to_cskd_state(state, canonical_model_name(model), backbone)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        if num_classes is None:
            cls = state.get("head.classifier.weight")
            if cls is None:
                raise ConfigError(f"{path}: cannot tell the number of classes; pass --{flag_prefix}num-classes")
            num_classes = int(cls.shape[0])
        aux = any(k.startswith("aux_head.") for k in state)
        try:
            net = build_segmentor(model, backbone, num_classes, aux=aux)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    load_weights(net, obj, name=str(path))
    dataset = ckpt.get("dataset") if isinstance(ckpt.get("dataset"), Mapping) else None
    config = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else None
    return LoadedModel(net, path, dict(dataset) if dataset else None, dict(config) if config else None)


__all__ = ["LoadedModel", "load_model"]
