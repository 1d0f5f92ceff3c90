"""``cskd convert``: a checkpoint between cskd's key layout and the published CSKD/CIRKD code's, both ways."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint to the published code's layout (or from it)",
        description="Write the weights of CHECKPOINT as a bare state dict in the published code's key layout "
                    "(--to official: loadable by its get_segmentation_model) or in cskd's (--to cskd). CHECKPOINT "
                    "may be a cskd checkpoint, a published CSKD/CIRKD/CIRKDV2 file (SegFormer included) or a Hugging Face "
                    "transformers SegFormer file (.safetensors, .bin or a save_pretrained directory). The model is "
                    "read from a cskd checkpoint's spec, or given with --model/--backbone for a bare state dict. "
                    "The weights are checked against the model before anything is written.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--to", choices=("official", "cskd"), required=True)
    p.add_argument("--out", required=True, help="output file (refused if it exists, unless --overwrite)")
    p.add_argument("--model", help="for a bare or published state dict: deeplabv3, pspnet, upernet or segformer")
    p.add_argument("--backbone", help="for a bare or published state dict: a registered backbone (cskd models), "
                                      "e.g. resnet18, mobilenetv3_large, mobilevit_xxs, mit_b0")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoints.official import official_model_name, to_official
    from ..checkpoints.loading import load_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    loaded = load_model(args.checkpoint, model=args.model, backbone=args.backbone, num_classes=args.num_classes)
    spec = loaded.model.spec
    assert spec is not None
    state = loaded.model.state_dict()
    if args.to == "official":
        state = to_official(state, spec.model, spec.backbone)
        note = f"published model name '{official_model_name(spec.model, spec.backbone)}', backbone '{spec.backbone}'"
    else:
        note = f"cskd {spec.model}/{spec.backbone}"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    print(f"wrote {out}: {len(state)} tensors, {note}, {spec.num_classes} classes, aux head: {spec.aux}")
    return 0
