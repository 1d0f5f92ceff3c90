"""Per-image latency and throughput of a segmentor's inference graph: PyTorch eager, ``torch.compile``d, and
ONNX Runtime on the CPU.

What is timed is the graph ``cskd export`` writes (:class:`cskd.deploy.wrapper.InferenceWrapper`: uint8 image in,
logits at the input size out, by default), batch 1, with the input already on the device: the cost of the model
and its resize, not of decoding or copying the image. Weights are random: latency does not depend on them.

Timing: on CUDA every call is bracketed by CUDA events (GPU time of the queued work, no host-side
synchronisation inside the measurement); on the CPU by ``time.perf_counter``. Warm-up calls come first (for
``compile`` the first one compiles, and its time is reported separately); then ``iters`` timed calls, or fewer if
``time_budget_s`` runs out (at least 3). Throughput is timed calls / their summed time, i.e. images per second
at batch 1.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..evaluation.inference import resolve_amp
from ..timing import time_calls
from ..models import Segmentor, build_segmentor, model_info
from ..models.segmentor import canonical_model_name, display_name
from .exporters import export_onnx, onnx_runner
from .graph import inference_copy
from .wrapper import GraphOptions, InferenceWrapper

BACKENDS: tuple[str, ...] = ("eager", "compile", "onnxruntime")
DEFAULT_MODELS: tuple[str, ...] = ("deeplabv3:resnet18", "deeplabv3:mobilenetv2", "pspnet:resnet18")


@dataclass(frozen=True)
class LatencyResult:
    model: str
    backbone: str
    height: int
    width: int
    backend: str
    device: str
    precision: str
    channels_last: bool
    median_ms: float
    p90_ms: float
    mean_ms: float
    throughput: float
    """Images per second at batch 1."""
    timed: int
    warmup: int
    first_call_s: float
    """The first warm-up call: for ``compile`` this is the compilation."""
    params_m: float
    """Parameters of the inference graph (no auxiliary head), millions."""
    gflops: float
    """Forward GFLOPs at this size (batch 1; multiply-add = 2), from ``cskd.models.model_info``."""


def parse_models(spec: str | Sequence[str]) -> list[tuple[str, str]]:
    """``"deeplabv3:resnet18,pspnet:resnet18"`` → [(model, backbone), ...]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        model, sep, backbone = item.partition(":")
        if not sep or not backbone:
            raise ConfigError(f"model {item!r}: write MODEL:BACKBONE, e.g. deeplabv3:resnet18")
        try:
            out.append((canonical_model_name(model), backbone))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not out:
        raise ConfigError("no models given")
    return out


def parse_sizes(spec: str | Sequence[str]) -> list[tuple[int, int]]:
    """``"512x1024,1024x2048"`` → [(512, 1024), (1024, 2048)]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        h, sep, w = item.partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or int(h) < 8 or int(w) < 8:
            raise ConfigError(f"size {item!r}: write HxW with both sides ≥ 8, e.g. 512x1024")
        out.append((int(h), int(w)))
    if not out:
        raise ConfigError("no sizes given")
    return out


def parse_backends(spec: str | Sequence[str]) -> list[str]:
    items = [i.strip() for i in (spec.split(",") if isinstance(spec, str) else spec) if i.strip()]
    for b in items:
        if b not in BACKENDS:
            raise ConfigError(f"backend {b!r}: choose from {', '.join(BACKENDS)}")
    if not items:
        raise ConfigError("no backends given")
    return items


@contextmanager
def _cudnn_autotune(enabled: bool) -> Iterator[None]:
    """The input size is fixed, so let cuDNN time its algorithms once and keep the fastest."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@dataclass(frozen=True)
class _Timing:
    warmup: int
    iters: int
    time_budget_s: float | None


def _graph_input(image: Tensor, options: GraphOptions) -> Tensor:
    # The values do not matter for latency; only the dtype the graph takes does.
    return image if options.input_format == "uint8" else image.float()


def _time_onnxruntime(net: Segmentor, image: Tensor, options: GraphOptions, path: Path,
                      timing: _Timing) -> tuple[list[float], float]:
    graph = InferenceWrapper(inference_copy(net, portable=True), options)
    x = _graph_input(image, options)
    export_onnx(graph, path, x, output_name=options.output_name)
    run = onnx_runner(path)
    return time_calls(lambda: run(x), warmup=timing.warmup, iters=timing.iters, cuda=False,
                      time_budget_s=timing.time_budget_s)


def _time_torch(net: Segmentor, image: Tensor, options: GraphOptions, *, device: torch.device, compile_: bool,
                amp: torch.dtype | None, channels_last: bool, compile_mode: str | None,
                timing: _Timing) -> tuple[list[float], float]:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # A copy: ``net`` stays on the CPU in its own layout for the next backend.
    graph = InferenceWrapper(inference_copy(net, portable=False), options).to(device=device, memory_format=layout)
    x = _graph_input(image.to(device).contiguous(memory_format=layout), options)
    fn: Callable[[Tensor], Tensor] = torch.compile(graph, mode=compile_mode) if compile_ else graph  # type: ignore[assignment]

    def call() -> Tensor:
        ctx = torch.autocast(device_type=device.type, dtype=amp) if amp is not None else nullcontext()
        with torch.inference_mode(), ctx:
            return fn(x)

    try:
        return time_calls(call, warmup=timing.warmup, iters=timing.iters, cuda=device.type == "cuda",
                          time_budget_s=timing.time_budget_s)
    finally:
        if compile_:
            torch._dynamo.reset()  # drop the compiled graph before the next model


def benchmark(
    models: Sequence[tuple[str, str]] | None = None,
    sizes: Sequence[tuple[int, int]] = ((512, 1024),),
    backends: Sequence[str] = ("eager", "onnxruntime"),
    *,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    channels_last: bool = True,
    options: GraphOptions = GraphOptions(),
    num_classes: int = 19,
    warmup: int = 2,
    iters: int = 10,
    time_budget_s: float | None = 30.0,
    compile_mode: str | None = None,
    workdir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> list[LatencyResult]:
    """Time every (model, size, backend); one :class:`LatencyResult` each.

    ``precision`` (``auto``: bf16 on CUDA, fp32 on the CPU; ``fp32``/``bf16``/``fp16``) is autocast for the
    PyTorch backends; ONNX Runtime runs the fp32 graph on the CPU with its default threads whatever ``device`` is.
    ``channels_last`` converts the model and the input to NHWC: the fast layout for cuDNN and for oneDNN on the
    CPU alike (DeepLabV3-MobileNetV2 and PSPNet-R18 at 512×1024 on 2 Zen 5 cores: −20 to −35 % eager latency).
    ``time_budget_s`` caps the timed calls (and half of it the warm-up) of one measurement. ``workdir`` keeps the
    ONNX files (default: a temporary folder). ``models`` defaults to :data:`DEFAULT_MODELS`."""
    models = parse_models(DEFAULT_MODELS) if models is None else list(models)
    backends = parse_backends(backends)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA device is available here; use the CPU")
    try:
        amp = resolve_amp(precision, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    timing = _Timing(max(1, warmup), max(1, iters), time_budget_s)
    say = log or (lambda _msg: None)
    results = []
    with tempfile.TemporaryDirectory(prefix="cskd-bench-") as tmp, _cudnn_autotune(device.type == "cuda"):
        folder = Path(workdir) if workdir is not None else Path(tmp)
        for model, backbone in models:
            net = build_segmentor(model, backbone, num_classes, aux=False).eval()
            for h, w in sizes:
                info = model_info(net, (h, w))
                image = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8)
                for backend in backends:
                    say(f"{model}:{backbone} {h}x{w} {backend} ...")
                    if backend == "onnxruntime":
                        path = folder / f"{model}_{backbone}_{h}x{w}.onnx"
                        times, first = _time_onnxruntime(net, image, options, path, timing)
                        where, prec, cl = "cpu", "fp32", False
                    else:
                        times, first = _time_torch(net, image, options, device=device, compile_=backend == "compile",
                                                   amp=amp, channels_last=channels_last, compile_mode=compile_mode,
                                                   timing=timing)
                        where, prec, cl = device.type, amp_name, channels_last
                    arr = np.asarray(times)
                    results.append(LatencyResult(
                        model=model, backbone=backbone, height=h, width=w, backend=backend, device=where,
                        precision=prec, channels_last=cl, median_ms=float(np.median(arr)),
                        p90_ms=float(np.percentile(arr, 90)), mean_ms=float(arr.mean()),
                        throughput=float(1e3 * len(arr) / arr.sum()), timed=len(arr), warmup=timing.warmup,
                        first_call_s=first, params_m=info.params_without_aux / 1e6, gflops=info.gflops,
                    ))
                    say(f"  median {results[-1].median_ms:.1f} ms, p90 {results[-1].p90_ms:.1f} ms "
                        f"({len(arr)} timed calls; first call {first:.2f} s)")
    return results


def _model_label(r: LatencyResult) -> str:
    return display_name(r.model, r.backbone)


def to_markdown(results: Sequence[LatencyResult], env: dict[str, Any] | None = None) -> str:
    """A Markdown table, one row per result, with the environment as a note below."""
    head = ("| Model | Input | Params (M) | GFLOPs | Backend | Device | Precision | Median (ms) | p90 (ms) "
            "| Throughput (img/s) |")
    rule = "|---|---|--:|--:|---|---|---|--:|--:|--:|"
    rows = [head, rule]
    for r in results:
        backend = r.backend + (" (NHWC)" if r.channels_last else "")
        rows.append(
            f"| {_model_label(r)} | {r.height}×{r.width} | {r.params_m:.2f} | {r.gflops:.1f} | {backend} | "
            f"{r.device} | {r.precision} | {r.median_ms:.1f} | {r.p90_ms:.1f} | {r.throughput:.2f} |"
        )
    text = "\n".join(rows) + "\n"
    if env:
        text += "\n" + "; ".join(f"{k}: {v}" for k, v in env.items()) + "\n"
    return text


def write_json(path: str | Path, results: Sequence[LatencyResult], env: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results]}, indent=2) + "\n")


__all__ = [
    "BACKENDS", "DEFAULT_MODELS", "LatencyResult", "benchmark", "parse_backends", "parse_models",
    "parse_sizes", "time_calls", "to_markdown", "write_json",
]
