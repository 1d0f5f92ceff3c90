"""``cskd export`` (a checkpoint's inference graph as ONNX / TorchScript, verified) and ``cskd bench-latency``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..deploy.export import export_model
from ..deploy.exporters import DEFAULT_OPSET, FORMATS, default_output_path
from ..deploy.latency import (
    BACKENDS,
    DEFAULT_MODELS,
    benchmark,
    parse_backends,
    parse_models,
    parse_sizes,
    to_markdown,
    write_json,
)
from ..deploy.verification import Tolerance
from ..deploy.wrapper import GraphOptions, describe_io
from ..timing import environment
from .evaluate import add_model_args, load_model, resolve_device

# ------------------------------------------------------------------------------------------------ cskd export


def register(sub: argparse._SubParsersAction) -> None:
    _register_export(sub)
    _register_bench(sub)


def _register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint's inference graph to ONNX or TorchScript, verified against PyTorch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Export the model of CHECKPOINT as an inference graph and check that it reproduces the PyTorch model.

The graph:  input "image"  N×3×H×W RGB, uint8 0..255 (default; ImageNet normalisation inside the graph)
                           or float32 already normalised, (x/255 − mean)/std (--input float)
            output "logits" float32 N×K×H×W: logits resized bilinearly to the input size
                   "labels" N×H×W class indices, uint8 (or int64) (--argmax)
File: <checkpoint stem>_<H>x<W>.onnx / .pt beside the checkpoint (_labels before the suffix with --argmax),
or --out. ONNX: opset 18, single file, cskd metadata in its metadata_props; TorchScript: torch.jit.trace,
metadata in the archive's extra file cskd.json.

Verification: the file is loaded back (onnxruntime on the CPU / torch.jit.load), run on a random image and on
real ones (--verify-images, else synthetic street scenes), and compared with eager PyTorch. It fails, the file
is removed and the command exits with an error, when max |Δlogit| > 1e-5 + 1e-3·max|logit|, when argmax
agreement is below 99.9 %, or when any pixel flips whose two best logits are further apart than twice that
tolerance. With --dynamic a batch of 2 at another size is checked too.""",
    )
    p.add_argument("checkpoint", type=Path, help="a cskd checkpoint, or a bare / published state dict")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="default: onnx")
    p.add_argument("--size", nargs=2, type=int, default=(512, 1024), metavar=("H", "W"),
                   help="input size of the graph (default 512 1024); with --dynamic, the size it is verified at")
    p.add_argument("--dynamic", action="store_true", help="batch, height and width are free (ONNX axes 'batch', "
                   "'height', 'width'); checked at a second size")
    p.add_argument("--input", choices=("uint8", "float"), default="uint8",
                   help="uint8 pixels (normalised in the graph, default) or float32 already normalised")
    p.add_argument("--argmax", action="store_true", help="output class indices 'labels' instead of 'logits'")
    p.add_argument("--labels-dtype", choices=("uint8", "int64"), default="uint8", help="with --argmax (default uint8)")
    p.add_argument("--align-corners", action=argparse.BooleanOptionalAction, default=True,
                   help="resize the logits with align_corners=True, as training and cskd eval do (default)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (≥ 17, default {DEFAULT_OPSET})")
    p.add_argument("--out", type=Path, help="output file (default: beside the checkpoint, see above)")
    p.add_argument("--verify-images", nargs="+", metavar="PATH",
                   help="image files or folders to verify on (resized to --size); default: synthetic scenes")
    p.add_argument("--verify-count", type=int, default=2,
                   help="synthetic images, or at most this many per folder (default 2)")
    add_model_args(p)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    h, w = args.size
    if h < 8 or w < 8:
        raise ConfigError(f"--size {h} {w}: both sides must be ≥ 8")
    if args.verify_count < 1:
        raise ConfigError(f"--verify-count {args.verify_count}: must be ≥ 1")
    options = GraphOptions(input_format=args.input, argmax=args.argmax, labels_dtype=args.labels_dtype,
                           align_corners=args.align_corners)
    loaded = load_model(args.checkpoint, model=args.model, backbone=args.backbone, num_classes=args.num_classes)
    out = args.out or default_output_path(args.checkpoint, args.format, (h, w), args.argmax)
    meta = {"checkpoint": args.checkpoint.name}
    if loaded.dataset:
        meta.update({k: loaded.dataset[k] for k in ("name", "class_names", "palette") if k in loaded.dataset})
    print(f"exporting {loaded.label} ({loaded.model.num_classes} classes) to {args.format} ...", flush=True)
    result = export_model(
        loaded.model, out, fmt=args.format, size=(h, w), options=options, dynamic=args.dynamic, opset=args.opset,
        verify_images=args.verify_images, verify_count=args.verify_count, tolerance=Tolerance(), metadata=meta,
    )
    kind = f"ONNX opset {args.opset}" if args.format == "onnx" else "TorchScript (traced)"
    print(f"wrote {result.path} ({kind}, {result.path.stat().st_size / 2**20:.1f} MiB)")
    inp, outp = describe_io(loaded.model.num_classes, (h, w), options, args.dynamic)
    print(f"  input  {inp}\n  output {outp}")
    runtime = "onnxruntime, CPU" if args.format == "onnx" else "torch.jit.load"
    print(f"verified against eager PyTorch ({runtime}):")
    for check in result.checks:
        print(f"  {check.describe()}")
    return 0


# ----------------------------------------------------------------------------------------- cskd bench-latency


def _register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-latency",
        help="per-image latency and throughput of the inference graphs (eager, compiled, ONNX Runtime)",
        description="Time the graph `cskd export` writes (random weights, batch 1, input already on the device) "
        "for each model, size and backend; print a Markdown table with parameters and GFLOPs. CUDA timings use "
        "CUDA events; 'onnxruntime' always runs on the CPU with its default threads. Defaults depend on the "
        "device: on CUDA 512x1024,1024x2048, eager,compile,onnxruntime, bf16 autocast, 10 warm-up and 50 timed "
        "calls; on the CPU 512x1024, eager,onnxruntime, fp32, 2 warm-up and 10 timed calls. channels_last by default.",
    )
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="MODEL:BACKBONE list (default: the students)")
    p.add_argument("--sizes", help="HxW list, e.g. 512x1024,1024x2048")
    p.add_argument("--backends", help=f"list from {', '.join(BACKENDS)}")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", help="autocast for PyTorch: auto (bf16 on CUDA, fp32 on CPU), "
                   "fp32, bf16, fp16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC model and input for the PyTorch backends (default; faster on CUDA and CPU alike)")
    p.add_argument("--input", choices=("uint8", "float"), default="uint8", help="graph input, as for cskd export")
    p.add_argument("--argmax", action="store_true", help="time the labels graph instead of the logits graph")
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--warmup", type=int, help="warm-up calls (the first compiles, for 'compile')")
    p.add_argument("--iters", type=int, help="timed calls")
    p.add_argument("--time-budget", type=float, default=30.0,
                   help="seconds of timed calls per measurement before stopping early (≥ 3 calls; default 30)")
    p.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune (default: torch's default)")
    p.add_argument("--out", type=Path, help="write the results and the environment as JSON")
    p.add_argument("--markdown", type=Path, help="write the table as Markdown")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    sizes = parse_sizes(args.sizes or ("512x1024,1024x2048" if cuda else "512x1024"))
    backends = parse_backends(args.backends or ("eager,compile,onnxruntime" if cuda else "eager,onnxruntime"))
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    iters = args.iters if args.iters is not None else (50 if cuda else 10)
    if warmup < 1 or iters < 1:
        raise ConfigError("--warmup and --iters must be ≥ 1")
    options = GraphOptions(input_format=args.input, argmax=args.argmax)
    results = benchmark(
        parse_models(args.models), sizes, backends, device=device, precision=args.precision,
        channels_last=args.channels_last, options=options, num_classes=args.num_classes, warmup=warmup,
        iters=iters, time_budget_s=args.time_budget, compile_mode=args.compile_mode, log=print,
    )
    env = environment(device)
    table = to_markdown(results, env)
    print()
    print(table, end="")
    if args.out:
        write_json(args.out, results, env)
        print(f"wrote {args.out}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
        print(f"wrote {args.markdown}")
    return 0


__all__ = ["register", "run_bench", "run_export"]
