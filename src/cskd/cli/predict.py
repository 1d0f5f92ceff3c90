"""``cskd predict``: write predictions of images, folders or a dataset split as pictures or submission files."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.io import IMAGE_SUFFIXES, read_image
from ..data.normalize import normalize
from ..data.workers import iterate as iterate_loader
from ..errors import ConfigError, DataError
from ..evaluation import collate_eval, predict_logits
from ..outputs.cityscapes import cityscapes_key
from ..outputs.maps import default_palette
from ..outputs.writers import FORMATS, WRITERS, Predicted, WriteContext, output_path
from .evaluate import (
    LoadedModel,
    add_inference_args,
    add_model_args,
    add_runtime_args,
    amp_dtype,
    describe_inference,
    fold_option,
    inference_options,
    load_model,
    open_dataset,
    prepare_model,
    resolve_device,
)

_CITYSCAPES_IDS = 19




class ImageFiles(Dataset):
    """Image files as the data loader's dict items (uint8 3×H×W ``image``, ``name`` = file stem)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        return {"image": read_image(path), "name": path.stem, "index": index}


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named in ``inputs``, folders searched recursively (sorted), each file once."""
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            hits = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not hits:
                raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            found.extend(hits)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})")
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    stems: dict[str, Path] = {}
    for p in unique:
        if p.stem in stems:
            raise DataError(f"two inputs share the name '{p.stem}' ({stems[p.stem]} and {p}); outputs are named by "
                            "file stem into one folder, so predict them into separate --out folders")
        stems[p.stem] = p
    return unique


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="write predictions as palette maps, overlays, panels or Cityscapes submission files",
        description="Predict INPUT (image files, folders searched recursively, or with --dataset/--split one dataset "
        "root) and write one PNG per image into --out. Formats: palette (indexed PNG, values = class ids), blend "
        "(palette over the image), panel (image | ground truth | prediction | teacher), trainid (grey PNG of "
        "class ids), cityscapes-submission (label-id PNGs named <city>_<seq>_<frame>_leftImg8bit.png, the test "
        "server's format; zip the folder's content). Never overwrites: refuses to start when an output file "
        "exists (for a dataset that does not list its names up front: when --out is not empty) unless "
        "--overwrite.",
    )
    p.add_argument("checkpoint", type=Path, help="a cskd checkpoint, or a bare / published state dict")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files / folders, or a dataset root")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", choices=FORMATS, default="palette")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the colours in --format blend (0..1)")
    p.add_argument("--dataset", help="INPUT is the root of this dataset (default name: the checkpoint's)")
    p.add_argument("--split", help="with a dataset root: the split to predict (default val)")
    p.add_argument("--teacher", type=Path, help="a second checkpoint whose prediction joins the panel")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_model_args(p, prefix="teacher-", what="--teacher")
    add_inference_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)


def _palette(loaded: LoadedModel, dataset: Any | None) -> list[tuple[int, ...]]:
    """The dataset's colours, else those the checkpoint recorded, else generated ones (bare state dicts)."""
    if dataset is not None and getattr(dataset, "palette", None):
        return [tuple(c) for c in dataset.palette]
    if loaded.dataset and loaded.dataset.get("palette"):
        return [tuple(c) for c in loaded.dataset["palette"]]
    return list(default_palette(loaded.model.num_classes))


def _dataset_names(dataset: Any) -> list[str] | None:
    """Sample names without decoding anything, where the dataset lists them (cskd's datasets do)."""
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, (list, tuple)) and all(hasattr(s, "name") for s in samples):
        return [str(s.name) for s in samples]
    return None


def _check_free(out_dir: Path, planned: list[Path] | None, overwrite: bool) -> None:
    """Refuse before any work when outputs exist (``planned`` None: any file in ``out_dir`` counts)."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder")
    if planned is None:
        existing = sorted(p.name for p in out_dir.iterdir())
        if existing:
            raise ConfigError(f"--out {out_dir} is not empty ({len(existing)} entries, e.g. {existing[0]}); this "
                              "dataset's names are known only when read, so pick an empty folder or pass --overwrite")
        return
    taken = [p for p in planned if p.exists()]
    if taken:
        raise ConfigError(f"{len(taken)} output file(s) exist already, e.g. {taken[0]}; pass --overwrite to replace "
                          "them or choose another --out")


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha must lie in [0, 1], got {args.alpha}")
    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, model=args.model, backbone=args.backbone, num_classes=args.num_classes)
    teacher = None
    if args.teacher is not None:
        if args.format != "panel":
            raise ConfigError("--teacher only adds a column to --format panel")
        teacher = load_model(args.teacher, model=args.teacher_model, backbone=args.teacher_backbone,
                             flag_prefix="teacher-")
        if teacher.model.num_classes != loaded.model.num_classes:
            raise ConfigError(f"--teacher {args.teacher} predicts {teacher.model.num_classes} classes, the model "
                              f"{loaded.model.num_classes}; a panel compares models of one dataset")
    opts = inference_options(args, loaded.config)
    amp = amp_dtype(args, device)
    fold = fold_option(args, loaded.config)
    if args.format == "cityscapes-submission" and loaded.model.num_classes != _CITYSCAPES_IDS:
        raise ConfigError(f"--format cityscapes-submission needs a 19-class Cityscapes model; {args.checkpoint} "
                          f"predicts {loaded.model.num_classes} classes")

    dataset = None
    if args.dataset or args.split:
        if len(args.inputs) != 1 or not Path(args.inputs[0]).is_dir():
            raise ConfigError("with --dataset/--split, INPUT is one dataset root folder")
        name = args.dataset or ((loaded.config or {}).get("data") or {}).get("dataset")
        if not name:
            raise ConfigError(f"{args.checkpoint} names no dataset; pass --dataset NAME")
        dataset = open_dataset(name, args.inputs[0], args.split or "val")
        if int(dataset.num_classes) != loaded.model.num_classes:
            raise ConfigError(f"the model predicts {loaded.model.num_classes} classes, {name} has "
                              f"{dataset.num_classes}")
        items: Dataset = dataset
        names = _dataset_names(dataset)
        if names is not None and args.format == "cityscapes-submission":
            for n in names:
                cityscapes_key(n)
        planned = None if names is None else [output_path(args.out, args.format, n) for n in names]
        _check_free(args.out, planned, args.overwrite)
        source = f"{name}/{args.split or 'val'} ({len(dataset)} images)"
    else:
        paths = find_images(args.inputs)
        if args.format == "cityscapes-submission":
            for p in paths:
                cityscapes_key(p.name)
        _check_free(args.out, [output_path(args.out, args.format, p.stem) for p in paths], args.overwrite)
        items = ImageFiles(paths)
        source = f"{len(paths)} image(s)"

    palette = _palette(loaded, dataset)
    net = prepare_model(loaded, device, fold=fold, dtype=amp)
    tnet = prepare_model(teacher, device, fold=fold, dtype=amp) if teacher is not None else None
    print(f"{args.checkpoint}: {loaded.label} on {source}, {describe_inference(opts, amp, device, fold)} "
          f"→ {args.out} ({args.format})")
    args.out.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(items, batch_size=1, shuffle=False, num_workers=args.workers, collate_fn=collate_eval)

    def predict(model: torch.nn.Module, image: torch.Tensor) -> np.ndarray:
        x = normalize(image.to(device, non_blocking=True))
        logits = predict_logits(model, x, amp_dtype=amp, **opts)
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()

    from tqdm.auto import tqdm

    write = WRITERS[args.format]
    ctx = WriteContext(palette, args.alpha, loaded.label,
                       teacher=(lambda image: predict(tnet, image)) if tnet is not None else None,
                       teacher_label=teacher.label if teacher is not None else "")
    written = 0
    with torch.inference_mode():
        for batch in tqdm(iterate_loader(loader), total=len(loader), desc="predict", unit="img",
                          disable=args.no_progress, dynamic_ncols=True):
            image = batch["image"] if isinstance(batch["image"], torch.Tensor) else batch["image"][0][None]
            name = str(batch["name"][0])
            item = Predicted(name, image, predict(net, image), batch.get("mask"))
            write(output_path(args.out, args.format, name), item, ctx)
            written += 1
    print(f"wrote {written} file(s) to {args.out}")
    if args.format == "cityscapes-submission":
        print(f"to submit: (cd {args.out} && zip -q -r ../{args.out.name}.zip .)")
    return 0


__all__ = ["ImageFiles", "find_images", "register", "run"]
