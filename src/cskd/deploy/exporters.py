"""Writing an inference graph as ONNX or TorchScript, and loading the file back as a runner (tensor in, tensor out)
for verification and timing."""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ExportError, first_line
from .wrapper import INPUT_NAME

ExportFormat = Literal["onnx", "torchscript"]

FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt"}
DEFAULT_OPSET = 18
MIN_OPSET = 17


def default_output_path(checkpoint: str | Path, fmt: ExportFormat, size: tuple[int, int], argmax: bool = False) -> Path:
    """``<checkpoint stem>_<H>x<W>[_labels].onnx`` / ``.pt`` beside the checkpoint (``_labels``: the argmax graph,
    so that it never overwrites the logits graph)."""
    checkpoint = Path(checkpoint)
    h, w = size
    return checkpoint.with_name(f"{checkpoint.stem}_{h}x{w}{'_labels' if argmax else ''}{SUFFIXES[fmt]}")


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ExportError(f"ONNX export needs the package '{name}': pip install 'cskd[onnx]'") from None


def export_onnx(
    graph: nn.Module,
    path: str | Path,
    example: Tensor,
    *,
    output_name: str,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``graph`` (called on ``example``) as a single-file ONNX model and check it with ``onnx.checker``.

    ``dynamic`` names the batch, height and width axes ``batch``/``height``/``width`` instead of fixing them.
    When ``dynamic``, pass a graph built on :func:`cskd.deploy.graph.inference_copy` (``portable=True``): see
    :func:`cskd.deploy.graph.adaptive_avg_pool2d_portable`."""
    if opset < MIN_OPSET:
        raise ConfigError(f"opset {opset}: the exporter needs opset ≥ {MIN_OPSET}")
    onnx = _require("onnx")
    _require("onnxscript")  # the dynamo exporter translates through it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_shapes = None
    if dynamic:
        from torch.export import Dim

        dynamic_shapes = ({0: Dim("batch"), 2: Dim("height"), 3: Dim("width")},)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            torch.onnx.export(
                graph, (example,), str(path), input_names=[INPUT_NAME], output_names=[output_name],
                opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes, external_data=False,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; the user needs the first line and the file
        raise ExportError(f"{path}: ONNX export failed: {first_line(e)}") from e
    proto = onnx.load(str(path))
    if metadata:
        onnx.helper.set_model_props(proto, dict(metadata))
        onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: the exported ONNX model is invalid: {first_line(e)}") from e
    return path


def export_torchscript(
    graph: nn.Module, path: str | Path, example: Tensor, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Trace ``graph`` on ``example`` and save it; ``metadata`` goes into the archive as ``cskd.json``.

    Tracing records shape arithmetic, so the traced model runs at other batch sizes and resolutions too (the
    verification checks one when the export is ``dynamic``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit is deprecated upstream, still works
        traced = torch.jit.trace(graph, example, check_trace=False)
        extra = {"cskd.json": json.dumps(dict(metadata or {}))}
        torch.jit.save(traced, str(path), _extra_files=extra)
    return path


GraphRunner = Callable[[Tensor], Tensor]
"""An exported file loaded back: input tensor in, output tensor out."""


def onnx_runner(path: str | Path) -> GraphRunner:
    """Run an exported ONNX file with onnxruntime on the CPU: tensor in, tensor out."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])

    return run


def torchscript_runner(path: str | Path) -> GraphRunner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return module(x)

    return run


def load_runner(path: str | Path, fmt: ExportFormat) -> GraphRunner:
    return onnx_runner(path) if fmt == "onnx" else torchscript_runner(path)


__all__ = ["DEFAULT_OPSET", "ExportFormat", "FORMATS", "GraphRunner", "MIN_OPSET", "SUFFIXES", "default_output_path",
           "export_onnx", "export_torchscript", "load_runner", "onnx_runner", "torchscript_runner"]
