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

Every export is verified before it is kept: the file is loaded back (onnxruntime on the CPU, ``torch.jit.load``)
and run on random images and on real ones (files given, else synthetic street scenes), and its outputs are compared
with the PyTorch model in eager mode. See :class:`Tolerance` for the thresholds and why they are what they are.
"""

from __future__ import annotations

import copy
import importlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..data.normalize import normalize
from ..errors import ConfigError, DataError, ExportError, first_line
from ..models import Segmentor
from ..models.heads import PyramidPooling

ExportFormat = Literal["onnx", "torchscript"]
InputFormat = Literal["uint8", "float"]
LabelsDtype = Literal["uint8", "int64"]

FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME = "image"
LOGITS_NAME = "logits"
LABELS_NAME = "labels"
DEFAULT_OPSET = 18
MIN_OPSET = 17
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_LABEL_DTYPES = {"uint8": torch.uint8, "int64": torch.int64}


# --------------------------------------------------------------------------------------------------- the graph


def _bin_weights(length: int, bins: int, like: Tensor) -> Tensor:
    """bins×length matrix whose row i averages positions ``[⌊i·L/n⌋, ⌈(i+1)·L/n⌉)``: the windows of
    ``adaptive_avg_pool`` (overlapping where ``n`` does not divide ``L``)."""
    pos = torch.arange(length, device=like.device)
    idx = torch.arange(bins, device=like.device)
    start = torch.div(idx * length, bins, rounding_mode="floor")
    end = torch.div((idx + 1) * length + bins - 1, bins, rounding_mode="floor")
    inside = (pos.unsqueeze(0) >= start.unsqueeze(1)) & (pos.unsqueeze(0) < end.unsqueeze(1))
    weights = inside.to(like.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def adaptive_avg_pool2d_portable(x: Tensor, bins: int) -> Tensor:
    """``F.adaptive_avg_pool2d(x, bins)`` as two matrix products whose weights are computed from the input size.

    The ONNX exporter lowers adaptive pooling with bin counts that do not divide the map (PSPNet's 3 and 6 bins on
    a 64×128 map) to index gathers fixed at the example's size, so a graph exported with dynamic H×W fails or
    is wrong at any other size. A window mean is separable (mean over a rectangle = row means of column means),
    so ``P_h · x · P_wᵀ`` with the averaging matrices above is the same pooling at every size."""
    h, w = x.shape[-2], x.shape[-1]
    return _bin_weights(h, bins, x) @ x @ _bin_weights(w, bins, x).transpose(0, 1)


class PortablePyramidPooling(nn.Module):
    """:class:`cskd.models.heads.PyramidPooling` with :func:`adaptive_avg_pool2d_portable`; shares its convs."""

    def __init__(self, source: PyramidPooling) -> None:
        super().__init__()
        self.bins = tuple(source.bins)
        self.convs = nn.ModuleList(getattr(source, f"conv{i}") for i in range(1, len(self.bins) + 1))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        outs = [x]
        for b, conv in zip(self.bins, self.convs, strict=True):
            pooled = conv(adaptive_avg_pool2d_portable(x, b))
            outs.append(F.interpolate(pooled, size, mode="bilinear", align_corners=True))
        return torch.cat(outs, dim=1)


def inference_copy(model: Segmentor, portable: bool = True) -> Segmentor:
    """A copy of ``model`` for export: without the auxiliary head (training only, it would just add weights to
    the file) and, with ``portable``, with pyramid poolings that export to size-independent ONNX. The original
    is untouched."""
    clone = copy.deepcopy(model)
    clone.aux_head = None
    if portable:
        for module in list(clone.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, PyramidPooling):
                    setattr(module, child_name, PortablePyramidPooling(child))
    return clone.eval()


@dataclass(frozen=True)
class GraphOptions:
    """What the exported graph takes and returns (see the module docstring)."""

    input_format: InputFormat = "uint8"
    argmax: bool = False
    labels_dtype: LabelsDtype = "uint8"
    align_corners: bool = True

    def __post_init__(self) -> None:
        if self.input_format not in ("uint8", "float"):
            raise ConfigError(f"input format {self.input_format!r}: choose uint8 or float")
        if self.labels_dtype not in _LABEL_DTYPES:
            raise ConfigError(f"labels dtype {self.labels_dtype!r}: choose uint8 or int64")

    @property
    def output_name(self) -> str:
        return LABELS_NAME if self.argmax else LOGITS_NAME


class InferenceWrapper(nn.Module):
    """image → (normalise) → segmentor → logits resized to the input → (argmax). Always in eval mode, and puts
    ``model`` in eval mode: an inference graph has no training behaviour (dropout, batch statistics, aux head)."""

    def __init__(self, model: Segmentor, options: GraphOptions = GraphOptions()) -> None:
        super().__init__()
        if options.argmax and options.labels_dtype == "uint8" and model.num_classes > 256:
            raise ConfigError(f"{model.num_classes} classes do not fit uint8 labels; use labels dtype int64")
        self.model = model
        self.options = options
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> InferenceWrapper:
        return super().train(False)

    def logits(self, image: Tensor) -> Tensor:
        # Same operations, in the same order, as cskd.data.normalize.normalize, so the graph matches the evaluator.
        x = image.float()
        if self.options.input_format == "uint8":
            x = (x / 255.0 - self.mean) / self.std
        out = self.model(x, with_aux=False).logits
        return F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=self.options.align_corners)

    def forward(self, image: Tensor) -> Tensor:
        logits = self.logits(image)
        if not self.options.argmax:
            return logits
        return logits.argmax(dim=1).to(_LABEL_DTYPES[self.options.labels_dtype])


def describe_io(num_classes: int, size: tuple[int, int], options: GraphOptions, dynamic: bool) -> tuple[str, str]:
    """Human-readable input and output specs (what ``cskd export`` prints)."""
    n, (h, w) = ("N", ("H", "W")) if dynamic else ("1", size)
    if options.input_format == "uint8":
        inp = f'"{INPUT_NAME}" uint8 {n}×3×{h}×{w} RGB in 0..255 (ImageNet normalisation inside the graph)'
    else:
        inp = f'"{INPUT_NAME}" float32 {n}×3×{h}×{w} RGB, already normalised: (x/255 − mean)/std, ImageNet'
    resize = f"resized bilinearly to the input, align_corners={options.align_corners}"
    if options.argmax:
        out = f'"{LABELS_NAME}" {options.labels_dtype} {n}×{h}×{w} class indices (argmax of logits {resize})'
    else:
        out = f'"{LOGITS_NAME}" float32 {n}×{num_classes}×{h}×{w} class scores ({resize})'
    return inp, out


# ------------------------------------------------------------------------------------------------- exporting


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
    Pass a graph from :func:`make_portable` when ``dynamic``: see :func:`adaptive_avg_pool2d_portable`."""
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


Runner = Callable[[Tensor], Tensor]


def onnx_runner(path: str | Path) -> Runner:
    """Run an exported ONNX file with onnxruntime on the CPU: tensor in, tensor out."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])

    return run


def torchscript_runner(path: str | Path) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return module(x)

    return run


def load_runner(path: str | Path, fmt: ExportFormat) -> Runner:
    return onnx_runner(path) if fmt == "onnx" else torchscript_runner(path)


# ---------------------------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Tolerance:
    """When an exported model counts as reproducing the PyTorch model (fp32 on both sides).

    - ``max |Δlogit| ≤ atol + rtol · max |logit|``: exporters fold BatchNorm into the convolutions, pick other
      convolution algorithms and fuse the resize, which reorders fp32 sums: that moves logits by ~1e-6 to 1e-5
      of their scale. Bugs an export can have (normalisation, channel order, ``align_corners``, a dropped or
      frozen-at-one-size layer) move them by a sizable fraction of it. 1e-3 sits two orders of magnitude from
      both. ``atol`` only keeps the bound positive for a model whose logits are all ~0.
    - argmax agreement ≥ ``min_agreement`` (99.9 %): a pixel whose two best classes are within the tolerance
      may flip legitimately; a flip where the reference's margin exceeds twice the tolerance cannot come from
      differences within it, so any such *decisive* flip is an error too. For a labels graph, which has no
      logits to compare, these two checks are the verification.
    """

    rtol: float = 1e-3
    atol: float = 1e-5
    min_agreement: float = 0.999


@dataclass(frozen=True)
class Check:
    """One verification input: how the exported model's output compares with eager PyTorch."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float | None
    """max |Δlogit|; None for a labels graph."""
    tolerance: float
    agreement: float
    """Fraction of pixels whose argmax class matches."""
    decisive_disagreements: int
    """Pixels whose class differs although the reference's top-2 margin exceeds 2 × tolerance."""
    min_agreement: float
    problem: str = ""
    """A structural mismatch (shape, dtype), if any."""

    @property
    def passed(self) -> bool:
        if self.problem or self.decisive_disagreements or self.agreement < self.min_agreement:
            return False
        return self.max_abs_diff is None or self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        dims = "×".join(str(s) for s in self.shape)
        parts = [f"{self.name} ({dims})"]
        if self.problem:
            return f"{parts[0]}: {self.problem}  FAILED"
        if self.max_abs_diff is not None:
            parts.append(f"max |Δlogit| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.2e})")
        parts.append(f"argmax agreement {100 * self.agreement:.3f}%")
        if self.decisive_disagreements:
            parts.append(f"{self.decisive_disagreements} decisive flips")
        return ", ".join(parts) + ("  ok" if self.passed else "  FAILED")


def compare_outputs(
    name: str, exported: Tensor, reference_logits: Tensor, options: GraphOptions, tolerance: Tolerance = Tolerance()
) -> Check:
    """Score the exported model's output against the eager model's (float32) logits for the same input."""
    ref = reference_logits.float()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    tol = tolerance.atol + tolerance.rtol * scale
    shape = tuple(ref.shape)
    want_shape = (shape[0], *shape[2:]) if options.argmax else shape
    want_dtype = _LABEL_DTYPES[options.labels_dtype] if options.argmax else torch.float32
    common = {"name": name, "shape": tuple(exported.shape), "tolerance": tol, "min_agreement": tolerance.min_agreement}
    if tuple(exported.shape) != want_shape or exported.dtype != want_dtype:
        problem = (f"output {exported.dtype} {tuple(exported.shape)}, expected {want_dtype} {want_shape}")
        return Check(max_abs_diff=None, agreement=0.0, decisive_disagreements=0, problem=problem, **common)
    ref_labels = ref.argmax(dim=1)
    if options.argmax:
        labels, diff = exported.long(), None
    else:
        labels, diff = exported.argmax(dim=1), float((exported.float() - ref).abs().max())
    differ = labels != ref_labels
    agreement = 1.0 - float(differ.float().mean())
    decisive = 0
    if bool(differ.any()) and ref.shape[1] > 1:
        top2 = ref.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        decisive = int((differ & (margin > 2 * tol)).sum())
    return Check(max_abs_diff=diff, agreement=agreement, decisive_disagreements=decisive, **common)


def _image_files(sources: Sequence[str | Path], limit: int) -> list[Path]:
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files.extend(found[:limit])
        elif src.is_file():
            files.append(src)
        else:
            raise DataError(f"{src}: no such image file or folder (--verify-images)")
    return files


def read_image(path: str | Path, size: tuple[int, int]) -> Tensor:
    """1×3×H×W uint8 RGB of the file, resized (bilinear) to ``size``."""
    from PIL import Image, UnidentifiedImageError

    h, w = size
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read the image ({first_line(e)})") from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).unsqueeze(0).contiguous()


def synthetic_images(count: int, size: tuple[int, int], seed: int = 0) -> list[Tensor]:
    """``count`` synthetic street scenes (1×3×H×W uint8, :mod:`cskd.data.synthetic`): images with the structure
    of photographs (large regions, edges, thin objects), on which a trained model's logits behave as on real ones."""
    from ..data.synthetic import render_sample

    images = (render_sample(seed, "val", i, size)[0] for i in range(count))
    return [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).unsqueeze(0).contiguous() for im in images]


def verification_inputs(
    size: tuple[int, int],
    *,
    images: Sequence[str | Path] | None = None,
    count: int = 2,
    dynamic: bool = False,
    seed: int = 0,
) -> list[tuple[str, Tensor]]:
    """Named uint8 N×3×H×W inputs: one random image, ``count`` real images (``images``: files or folders; default:
    synthetic street scenes) at ``size``, and with ``dynamic`` a random batch of 2 at another, odd size."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    inputs = [("random", torch.randint(0, 256, (1, 3, h, w), generator=gen, dtype=torch.uint8))]
    if images:
        inputs += [(p.name, read_image(p, size)) for p in _image_files(images, count)]
    else:
        inputs += [(f"synthetic #{i + 1}", im) for i, im in enumerate(synthetic_images(count, size, seed))]
    if dynamic:
        other = (max(9, h * 3 // 4 + 3), max(9, w * 3 // 4 + 5))
        inputs.append(("random, other size", torch.randint(0, 256, (2, 3, *other), generator=gen, dtype=torch.uint8)))
    return inputs


def verify(
    runner: Runner,
    reference: InferenceWrapper,
    inputs: Sequence[tuple[str, Tensor]],
    tolerance: Tolerance = Tolerance(),
) -> list[Check]:
    """Run ``runner`` (the exported model) and ``reference`` (eager) on each uint8 input; ``float`` graphs get the
    input normalised first. Returns one :class:`Check` per input; raising is the caller's choice."""
    checks = []
    for name, image in inputs:
        x = normalize(image) if reference.options.input_format == "float" else image
        with torch.no_grad():
            expected = reference.logits(x)
        try:
            got = runner(x)
        except Exception as e:  # a runtime failing on a valid input is a verification failure, not a crash
            checks.append(Check(name, tuple(x.shape), None, 0.0, 0.0, 0, tolerance.min_agreement,
                                problem=f"the exported model failed to run: {first_line(e)}"))
            continue
        checks.append(compare_outputs(name, got, expected, reference.options, tolerance))
    return checks


# --------------------------------------------------------------------------------------------- the whole job


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
        export_onnx(graph, path, example, output_name=options.output_name, dynamic=dynamic, opset=opset,
                    metadata=meta)
    else:
        # Traced TorchScript runs aten's adaptive pooling at any size: no portable pooling needed.
        export_torchscript(InferenceWrapper(inference_copy(model, portable=False), options), path, example,
                           metadata=meta)
    inputs = verification_inputs(size, images=verify_images, count=verify_count, dynamic=dynamic)
    checks = verify(load_runner(path, fmt), reference, inputs, tolerance)
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


__all__ = [
    "DEFAULT_OPSET", "ExportError", "ExportResult", "FORMATS", "GraphOptions", "INPUT_NAME", "InferenceWrapper",
    "LABELS_NAME", "LOGITS_NAME", "PortablePyramidPooling", "SUFFIXES", "Check", "Tolerance",
    "adaptive_avg_pool2d_portable", "compare_outputs", "default_output_path", "describe_io", "export_model",
    "export_onnx", "export_torchscript", "inference_copy", "load_runner", "onnx_runner",
    "read_image", "synthetic_images", "torchscript_runner", "verification_inputs", "verify",
]
