"""Deployment: a segmentor's inference graph as ONNX or TorchScript, checked against PyTorch before it is kept.

The exported graph (:class:`InferenceWrapper`) is what a deployed model needs and nothing more:

- input ``"image"``: N×3×H×W, RGB. By default **uint8 in [0, 255]**, normalised inside the graph exactly as
  :func:`cskd.data.normalize.normalize` does (``(x / 255 − mean) / std``, ImageNet statistics), so a caller feeds
  decoded pixels and cannot get the statistics or the scaling wrong. ``input_format="float"`` takes float32 that
  is *already* normalised (what the evaluator feeds the model).
- output ``"logits"``: float32 N×K×H×W, the stride-8 logits resized bilinearly to the input size; or, with
  ``argmax=True``, ``"labels"``: N×H×W class indices (uint8 by default, int64 on request).
- the resize uses ``align_corners=True`` by default, as the training loss and :func:`cskd.evaluation.predict_logits`
  do (the published checkpoints score as published with it); ``align_corners=False`` is available.

ONNX goes through ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, default since torch
2.9; the TorchScript-based one is deprecated), opset 18 by default. TorchScript goes through ``torch.jit.trace``
(deprecated upstream since torch 2.10 in favour of ``torch.export``, still working; its warnings are silenced).

The job is in four modules: :mod:`~cskd.deploy.graph` rewrites the model for export, :mod:`~cskd.deploy.wrapper`
is the inference graph, :mod:`~cskd.deploy.exporters` writes and loads the files, :mod:`~cskd.deploy.verification`
compares them with PyTorch; :func:`export_model` here runs them in that order.

Every export is verified before it is kept: the file is loaded back (onnxruntime on the CPU, ``torch.jit.load``)
and run on random images and on real ones (files given, else synthetic street scenes), and its outputs are compared
with the PyTorch model in eager mode. See :class:`Tolerance` for the thresholds and why they are what they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..data.normalize import normalize
from ..errors import ConfigError, ExportError
from ..models import Segmentor
from . import exporters
from .exporters import DEFAULT_OPSET, FORMATS, ExportFormat
from .graph import inference_copy
from .verification import Check, Tolerance, verification_inputs, verify
from .wrapper import INPUT_NAME, GraphOptions, InferenceWrapper, describe_io



@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    input_spec: str
    output_spec: str
    checks: list[Check]
    metadata: dict[str, str]


def _metadata(model: Segmentor, size: tuple[int, int], options: GraphOptions, dynamic: bool,
              extra: Mapping[str, Any] | None) -> dict[str, str]:
    spec = model.spec
    meta: dict[str, Any] = {
        "cskd_version": __version__,
        "model": spec.model if spec else "",
        "backbone": spec.backbone if spec else "",
        "num_classes": model.num_classes,
        "input_name": INPUT_NAME,
        "input_format": options.input_format,
        "input_layout": "NCHW RGB",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "output_name": options.output_name,
        "align_corners": options.align_corners,
        "export_size": list(size),
        "dynamic": dynamic,
    }
    meta.update(extra or {})
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def export_model(
    model: Segmentor,
    path: str | Path,
    *,
    fmt: ExportFormat = "onnx",
    size: tuple[int, int] = (512, 1024),
    options: GraphOptions = GraphOptions(),
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    verify_images: Sequence[str | Path] | None = None,
    verify_count: int = 2,
    tolerance: Tolerance = Tolerance(),
    metadata: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Export ``model``'s inference graph to ``path`` and verify it (see the module docstring).

    Raises :class:`ExportError` if the export fails or any verification input fails its check; the file is
    removed then, so that a model that does not reproduce the PyTorch one is never left to deploy."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    h, w = size
    if h < 8 or w < 8:
        raise ConfigError(f"export size {h}×{w}: both sides must be ≥ 8 (the model's output stride)")
    model.eval()
    reference = InferenceWrapper(model, options)
    meta = _metadata(model, size, options, dynamic, metadata)
    # A dynamic batch axis needs an example batch other than 1: torch.export specialises size-1 dimensions.
    batch = 2 if dynamic else 1
    example = torch.zeros(batch, 3, h, w, dtype=torch.uint8)
    if options.input_format == "float":
        example = normalize(example)
    path = Path(path)
    if fmt == "onnx":
        graph = InferenceWrapper(inference_copy(model, portable=True), options)
        exporters.export_onnx(graph, path, example, output_name=options.output_name, dynamic=dynamic, opset=opset,
                    metadata=meta)
    else:
        # Traced TorchScript runs aten's adaptive pooling at any size: no portable pooling needed.
        exporters.export_torchscript(InferenceWrapper(inference_copy(model, portable=False), options), path, example,
                           metadata=meta)
    inputs = verification_inputs(size, images=verify_images, count=verify_count, dynamic=dynamic)
    checks = verify(exporters.load_runner(path, fmt), reference, inputs, tolerance)
    inp, out = describe_io(model.num_classes, size, options, dynamic)
    failed = [c for c in checks if not c.passed]
    if failed:
        path.unlink(missing_ok=True)
        lines = "\n  ".join(c.describe() for c in checks)
        raise ExportError(
            f"{path}: the exported model does not reproduce the PyTorch model (file removed):\n  {lines}\n"
            f"tolerance: max |Δlogit| ≤ {tolerance.atol:g} + {tolerance.rtol:g}·max|logit|, argmax agreement ≥ "
            f"{100 * tolerance.min_agreement:g}% and no decisive flips"
        )
    return ExportResult(path, fmt, inp, out, checks, meta)


__all__ = ["ExportResult", "export_model"]
