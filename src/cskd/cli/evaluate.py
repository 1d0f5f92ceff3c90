"""``cskd eval``: score a checkpoint on a labelled split; print the per-class table, save JSON / CSV / Markdown.

The helpers here (loading a model from any checkpoint kind, the shared inference options) serve ``cskd predict``
too.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..distributed import resolve_device
from ..errors import CheckpointError, ConfigError
from ..evaluation.inference import MODES, resolve_amp
from ..checkpoints.loading import LoadedModel, load_model
from ..models.epilogue import frozen_copy
from ..models.segmentor import MODELS, Segmentor

# ------------------------------------------------------------------------------------------- shared with predict


def add_model_args(p: argparse.ArgumentParser, prefix: str = "", what: str = "CHECKPOINT") -> None:
    g = p.add_argument_group(f"model, for a bare or published state dict as {what}")
    g.add_argument(f"--{prefix}model", choices=MODELS + ("psp", "deeplab"), help="segmentation head")
    g.add_argument(f"--{prefix}backbone", help="e.g. resnet18, resnet101, mobilenetv2")
    if not prefix:
        g.add_argument("--num-classes", type=int, help="default: read off the classifier weights")


def add_inference_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference (defaults: the checkpoint's eval settings, else whole-image, one scale)")
    g.add_argument("--mode", choices=MODES, help="whole image at once (the published protocol) or sliding windows")
    g.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"), help="window size for --mode slide")
    g.add_argument("--stride", nargs=2, type=int, metavar=("H", "W"), help="window step (default: 2/3 of --crop)")
    g.add_argument("--scales", nargs="+", type=float, metavar="S", help="e.g. 0.5 0.75 1.0 1.25 1.5 1.75")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also predict the mirrored image and average")
    g.add_argument("--window-batch", type=int, help="at most this many windows per forward pass (slide mode)")
    g.add_argument("--amp", default="auto", help="autocast dtype: auto (bf16 on CUDA, none on CPU), bf16, fp16, none")
    g.add_argument("--align-corners", action=argparse.BooleanOptionalAction, default=True,
                   help="resize logits with align_corners=True, as the published code (default)")
    g.add_argument("--fold-batchnorm", action=argparse.BooleanOptionalAction, default=None,
                   help="run a frozen copy: BatchNorms folded into their convs, conv epilogues in cuDNN's call on "
                   "CUDA, weights in the autocast dtype (default: the checkpoint's eval.fold_batchnorm, else off)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=4, help="data loader processes")


def inference_options(args: argparse.Namespace, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments for ``predict_logits`` / ``evaluate``: flags first, then the checkpoint's ``eval``
    block, then the published protocol (whole image, one scale, no flip)."""
    ecfg = dict((config or {}).get("eval") or {})
    mode = args.mode or ecfg.get("mode") or "whole"
    crop = args.crop or ecfg.get("crop_size")
    stride = args.stride or ecfg.get("stride")
    scales = args.scales or ecfg.get("scales") or (1.0,)
    flip = args.flip if args.flip is not None else bool(ecfg.get("flip", False))
    if mode == "slide" and crop is None:
        raise ConfigError("--mode slide needs a window size: --crop H W (e.g. --crop 512 1024 for Cityscapes)")
    if any(s <= 0 for s in scales):
        raise ConfigError(f"--scales must be positive, got {list(scales)}")
    if args.window_batch is not None and args.window_batch < 1:
        raise ConfigError(f"--window-batch must be ≥ 1, got {args.window_batch}")
    return {
        "mode": mode,
        "crop_size": tuple(crop) if crop is not None else None,
        "stride": tuple(stride) if stride is not None else None,
        "scales": tuple(float(s) for s in scales),
        "flip": flip,
        "align_corners": args.align_corners,
        "window_batch": args.window_batch,
    }


def fold_option(args: argparse.Namespace, config: Mapping[str, Any] | None) -> bool:
    """--fold-batchnorm, else the checkpoint's ``eval.fold_batchnorm``, else off."""
    if args.fold_batchnorm is not None:
        return bool(args.fold_batchnorm)
    return bool(dict((config or {}).get("eval") or {}).get("fold_batchnorm", False))


def amp_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    try:
        return resolve_amp(args.amp, device)
    except ValueError as e:
        raise ConfigError(f"--amp: {e}") from None


def describe_inference(opts: Mapping[str, Any], amp: torch.dtype | None, device: torch.device,
                       fold: bool = False) -> str:
    mode = opts["mode"]
    if mode == "slide":
        mode += f" crop {opts['crop_size'][0]}×{opts['crop_size'][1]}"
        if opts["stride"]:
            mode += f" stride {opts['stride'][0]}×{opts['stride'][1]}"
    scales = ", ".join(f"{s:g}" for s in opts["scales"])
    amp_s = str(amp).replace("torch.", "") if amp else "fp32"
    return (f"{mode}, scales {scales}{', flip' if opts['flip'] else ''}{', BatchNorms folded' if fold else ''}, "
            f"{amp_s} on {device}")


def open_dataset(name: str, root: str | Path, split: str) -> Any:
    from ..data import build_dataset, build_eval_transform

    return build_dataset(name, str(root), split, transform=build_eval_transform())


def prepare_model(loaded: LoadedModel, device: torch.device, *, fold: bool = False,
                  dtype: torch.dtype | None = None) -> Segmentor:
    """The loaded model on ``device`` in eval mode; with ``fold``, its frozen copy (BatchNorms folded, weights in
    ``dtype``, the autocast dtype), as validation's ``eval.fold_batchnorm`` scores it."""
    net = loaded.model.to(device).eval()
    if fold:
        net = frozen_copy(net, dtype)
    if device.type == "cuda":  # NHWC convolutions are the fast path for cuDNN under bf16
        net = net.to(memory_format=torch.channels_last)
    return net


# ------------------------------------------------------------------------------------------------- cskd eval


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a checkpoint on a labelled split (mIoU, per-class IoU, accuracies)",
        description="Score CHECKPOINT on a dataset split. Prints the per-class table and writes "
        "<checkpoint>_<split>_<mode>….json/.csv/.md beside the checkpoint (or into --out); re-running replaces "
        "those files. Classes absent from both ground truth and prediction are shown n/a and left out of the means.",
    )
    p.add_argument("checkpoint", type=Path, help="a cskd checkpoint, or a bare / published state dict")
    p.add_argument("--dataset", help="dataset name (default: the checkpoint's training config)")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's training config)")
    p.add_argument("--split", help="split to score (default: the config's val split, else 'val')")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (default 1: full-size images)")
    p.add_argument("--max-images", type=int, help="score only the first N images (a quick check)")
    p.add_argument("--out", type=Path, help="folder for the metric files (default: the checkpoint's folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_inference_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader, Subset

    from ..evaluation import collate_eval, evaluate

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, model=args.model, backbone=args.backbone, num_classes=args.num_classes)
    data_cfg = dict((loaded.config or {}).get("data") or {})
    name = args.dataset or data_cfg.get("dataset")
    root = args.data_root or (data_cfg.get("root") if (args.dataset in (None, data_cfg.get("dataset"))) else None)
    if not name or not root:
        raise ConfigError(f"{args.checkpoint}: the checkpoint names no dataset; pass --dataset NAME --data-root PATH")
    split = args.split or data_cfg.get("val_split") or "val"
    opts = inference_options(args, loaded.config)
    amp = amp_dtype(args, device)
    fold = fold_option(args, loaded.config)

    dataset = full = open_dataset(name, root, split)
    num_classes = int(full.num_classes)
    if loaded.model.num_classes != num_classes:
        raise CheckpointError(
            f"{args.checkpoint}: the model predicts {loaded.model.num_classes} classes, {name} has {num_classes}; "
            "evaluate it on the dataset it was trained for"
        )
    if args.max_images is not None:
        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_eval)
    net = prepare_model(loaded, device, fold=fold, dtype=amp)
    print(f"{args.checkpoint}: {loaded.label} on {name}/{split} ({len(dataset)} images), "
          f"{describe_inference(opts, amp, device, fold)}")
    start = time.perf_counter()
    metrics = evaluate(net, loader, num_classes=num_classes, device=device, amp_dtype=amp,
                       progress=not args.no_progress, **opts)
    seconds = time.perf_counter() - start
    class_names = list(full.class_names)
    print(metrics.table(class_names))
    stem = f"{args.checkpoint.stem}_{split}_{opts['mode']}"
    if opts["scales"] != (1.0,):
        stem += "_ms" + "-".join(f"{s:g}" for s in opts["scales"])
    if opts["flip"]:
        stem += "_flip"
    run_info = {
        "checkpoint": str(args.checkpoint), "model": loaded.label, "dataset": name, "root": str(root),
        "split": split, "images": len(dataset), **{k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in opts.items()},
        "amp": str(amp).replace("torch.", "") if amp else None, "fold_batchnorm": fold, "device": str(device),
        "seconds": round(seconds, 2),
    }
    paths = metrics.save(args.out or args.checkpoint.parent, stem=stem, class_names=class_names, extra=run_info)
    print(f"{len(dataset)} images in {seconds:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0


__all__ = ["LoadedModel", "add_inference_args", "add_model_args", "add_runtime_args", "fold_option",
           "inference_options", "load_model", "open_dataset", "prepare_model", "register", "resolve_device", "run"]
