"""Any timm model with ``features_only`` as a backbone: ``backbone: timm:<name>`` (e.g. ``timm:convnext_tiny``).

The model is built by ``timm.create_model(name, features_only=True, output_stride=8, pretrained=False)``
(``output_stride`` only where the model accepts it; otherwise at its native strides). Its stage widths and strides
come from timm's ``feature_info``; the deepest four stages are the backbone's stages. Nothing is downloaded:
ImageNet weights come only from a local file in the timm model's own layout (``model.pretrained_base``), loaded by
timm's own loader (which drops the classifier). timm is an optional dependency (``pip install cskd[timm]``).
Norm layers are timm's; under DDP, ``SyncBatchNorm.convert_sync_batchnorm`` converts its BatchNorms like ours.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]
MAX_STAGES = 4


def _timm(name: str = "<name>") -> Any:
    try:
        import timm
    except ImportError:
        raise ValueError(
            f"backbone 'timm:{name}' needs timm, an optional dependency: pip install 'cskd[timm]' (or timm)"
        ) from None
    return timm


@lru_cache(maxsize=1)
def _all_names() -> tuple[str, ...]:
    return tuple(_timm().list_models())  # only called after _timm(name) succeeded


def check_timm_name(name: str) -> None:
    """ValueError naming the value and the closest timm model names, if timm has no model ``name``."""
    _timm(name)
    names = _all_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = f"; closest timm names: {', '.join(close)}" if close else "; see timm.list_models()"
    raise ValueError(f"unknown timm model {name!r} in backbone 'timm:{name}'{hint}")


class TimmBackbone(nn.Module):
    """A timm ``features_only`` network returning its deepest (up to) four stage maps."""

    def __init__(
        self, name: str, norm_layer: NormLayer | None = None, pretrained: str | Path | None = None,
        output_stride: int = 8,
    ) -> None:
        super().__init__()
        del norm_layer  # timm's models bring their own norm layers
        timm = _timm(name)
        check_timm_name(name)
        kwargs: dict[str, Any] = {"features_only": True}
        if pretrained is not None:
            path = Path(pretrained)
            if not path.is_file():
                raise ValueError(f"timm:{name}: pretrained_base {str(path)!r}: no such file")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        else:
            kwargs["pretrained"] = False
        self.body = self._create(timm, name, kwargs, output_stride)
        info = self.body.feature_info
        channels, reductions = list(info.channels()), list(info.reduction())
        self._keep = min(MAX_STAGES, len(channels))
        self.out_channels: tuple[int, ...] = tuple(int(c) for c in channels[-self._keep:])
        self.reductions: tuple[int, ...] = tuple(int(r) for r in reductions[-self._keep:])
        self.timm_name = name

    @staticmethod
    def _create(timm: Any, name: str, kwargs: dict[str, Any], output_stride: int) -> nn.Module:
        try:
            try:
                return timm.create_model(name, output_stride=output_stride, **kwargs)
            except (TypeError, ValueError, AssertionError, NotImplementedError) as e:
                if "features_only" in str(e):
                    raise
                return timm.create_model(name, **kwargs)  # no output_stride for this model: native strides
        except RuntimeError as e:
            if "features_only" in str(e):
                raise ValueError(
                    f"backbone 'timm:{name}': this timm model has no features_only mode (per-stage feature maps), "
                    "which a segmentation backbone needs; choose a CNN or hierarchical transformer "
                    "(e.g. timm:convnext_tiny, timm:efficientnet_b0, timm:resnet50)"
                ) from None
            raise
        except (TypeError, ValueError, AssertionError, NotImplementedError) as e:
            raise ValueError(f"backbone 'timm:{name}': timm cannot build it with features_only ({e})") from None

    @property
    def output_stride(self) -> int:
        return self.reductions[-1]

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x))[-self._keep:]


__all__ = ["TimmBackbone", "check_timm_name"]
