"""Fitting weights into a model, with errors that say what does not fit.

Every file is read through :func:`cskd.checkpoints.files.safe_load` (``torch.load(..., weights_only=True)``);
published-layout files are converted by :mod:`cskd.checkpoints.official`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import CheckpointError
from ..models.segmentor import Segmentor
from .files import safe_load
from .official import backbone_state_dict, from_official, is_official_layout, to_cskd_state, unwrap_state_dict

_MAX_LISTED = 8


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The model weights inside a loaded file: a bare state dict, or one under ``model`` / ``state_dict`` /
    ``student`` (cskd training checkpoints keep the student under ``model``)."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "student"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(
        f"{source}: no state dict found (expected a mapping of parameter names to tensors, or one under the key "
        "'model', 'state_dict' or 'student')"
    )


def _fit_report(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], ignore_missing: tuple[str, ...] = ()
) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in given and not k.endswith(ignore_missing)]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, mismatched


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def check_fit(module: nn.Module, state: Mapping[str, Tensor], source: str, hint: str = "") -> None:
    """Raise :class:`CheckpointError` listing missing / unexpected keys and shape mismatches, if any."""
    expected = module.state_dict()
    missing, unexpected, mismatched = _fit_report(expected, state)
    if not (missing or unexpected or mismatched):
        return
    msg = f"{source}: the weights do not fit the model"
    if missing:
        msg += _listing("missing from the checkpoint", missing)
    if unexpected:
        msg += _listing("in the checkpoint but not in the model", unexpected)
    if mismatched:
        msg += _listing("shape mismatch", mismatched)
    raise CheckpointError(msg + ("\n  " + hint if hint else ""))


@lru_cache(maxsize=None)
def _registered_layout(name: str) -> frozenset[tuple[str, tuple[int, ...]]]:
    """(key, shape) pairs of a registered backbone's state dict, built on the meta device (no memory, no init)."""
    from ..models.backbones import BACKBONES

    with torch.device("meta"):
        module = BACKBONES[name].builder()
    return frozenset((k, tuple(v.shape)) for k, v in module.state_dict().items())


def _check_backbone_family(backbone: nn.Module, state: Mapping[str, Tensor], model_backbone: str, source: str) -> None:
    """A one-line error when ``state``'s backbone entries are exactly another registered backbone's."""
    from ..models.backbones import backbone_names

    got = frozenset((k, tuple(v.shape)) for k, v in backbone_state_dict(state).items())
    own = frozenset((k, tuple(v.shape)) for k, v in backbone.state_dict().items())
    if not got or got == own:
        return
    for name in backbone_names():
        if name != model_backbone and _registered_layout(name) == got:
            raise CheckpointError(
                f"{source}: the checkpoint holds a {name!r} backbone and the model a {model_backbone!r} one; "
                f"build the model with backbone {name!r} (choices: {', '.join(backbone_names())})"
            )


def _segmentor_hint(model: Segmentor, state: Mapping[str, Tensor]) -> str:
    spec = model.spec
    hints = []
    cls = state.get("head.classifier.weight")
    if cls is not None and cls.shape[0] != model.num_classes:
        hints.append(
            f"the checkpoint predicts {cls.shape[0]} classes and the model {model.num_classes}: build the model "
            f"with num_classes={cls.shape[0]} (or fine-tune from the backbone only with a pretrained-base option)"
        )
    if spec is not None:
        has_aux = any(k.startswith("aux_head.") for k in state)
        if has_aux != spec.aux:
            hints.append(f"the checkpoint {'has' if has_aux else 'has no'} auxiliary head: set aux={has_aux}")
        hints.append(
            f"the model is {spec.model}/{spec.backbone}; check that the checkpoint was trained for the same pair"
        )
    return "; ".join(hints)


def load_weights(
    model: Segmentor, source: str | Path | Mapping[str, Tensor], strict: bool = True, name: str | None = None
) -> None:
    """Load a full segmentor checkpoint into ``model``: a cskd checkpoint, a published CSKD/CIRKD/CIRKDV2 file
    (detected by its ``pretrained.*`` keys, or CIRKDV2 SegFormer's top-level encoder, and converted) or a Hugging
    Face ``transformers`` SegFormer file (detected by its ``segformer.*`` keys). ``strict`` (the default)
    requires an exact fit.
    ``name`` labels an in-memory state dict in error messages (a path labels itself)."""
    name = name or (str(source) if not isinstance(source, Mapping) else "state dict")
    obj = safe_load(source) if not isinstance(source, Mapping) else source
    state = extract_state_dict(obj, name)
    if model.spec is not None:
        state = to_cskd_state(state, model.spec.model, model.spec.backbone)
    elif is_official_layout(state):
        raise CheckpointError(f"{name}: a published-layout file needs a model built by build_segmentor")
    else:
        state = to_cskd_state(state, "", "")  # cskd or transformers keys need no model names
    if strict:
        if model.spec is not None:
            _check_backbone_family(model.backbone, state, model.spec.backbone, name)
        check_fit(model, state, name, _segmentor_hint(model, state))
    else:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(state, strict=strict)


def load_backbone_weights(
    model: Segmentor | nn.Module, source: str | Path | Mapping[str, Tensor], backbone_name: str | None = None
) -> None:
    """Load ImageNet backbone weights (e.g. ``resnet18-imagenet.pth``) into a segmentor's backbone (or into a
    bare backbone module, named by ``backbone_name`` for the error messages), strictly: every backbone tensor must
    come from the file."""
    backbone = model.backbone if isinstance(model, Segmentor) else model
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    obj = safe_load(source) if not isinstance(source, Mapping) else source
    state = backbone_state_dict(extract_state_dict(obj, name))
    spec = getattr(model, "spec", None)
    backbone_name = backbone_name or (spec.backbone if spec is not None else None)
    if backbone_name is not None:
        _check_backbone_family(backbone, state, backbone_name, name)
    check_fit(
        backbone, state, name,
        "a backbone file must match the backbone's architecture (e.g. resnet18-imagenet.pth for resnet18)",
    )
    backbone.load_state_dict(state)


def load_teacher_weights(teacher: Segmentor, path: str, keep_aux: bool = False) -> None:
    """Teacher files usually carry an auxiliary head the frozen teacher does not run here: drop it (unless
    ``keep_aux``: a loss that distils the aux logits, e.g. DIST, needs it). Any supported layout: cskd, published
    CSKD/CIRKD/CIRKDV2, or a ``transformers`` SegFormer file or folder."""
    from .huggingface import read_state_file

    state = read_state_file(path)  # .pth/.bin, .safetensors or a transformers save_pretrained directory
    assert teacher.spec is not None
    state = to_cskd_state(state, teacher.spec.model, teacher.spec.backbone)
    if not keep_aux:
        state = {k: v for k, v in state.items() if not k.startswith("aux_head.")}
    load_weights(teacher, state, name=path)


__all__ = ["check_fit", "extract_state_dict", "load_backbone_weights", "load_teacher_weights", "load_weights"]
