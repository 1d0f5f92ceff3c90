"""``cskd info``: parameters, FLOPs, output stride and feature channels of a segmentor."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError
from ..models import build_segmentor, model_info
from ..models.backbones import backbone_names
from ..models.heads import head_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="parameters, GFLOPs, output stride and feature channels of a model",
        description="Build MODEL on BACKBONE with random weights and report its size and cost. GFLOPs are counted "
        "by torch.utils.flop_counter (a multiply-add = 2 FLOPs; convolutions and matrix products), batch 1.",
    )
    p.add_argument("model", help=f"segmentation head: {', '.join(head_names())} (or psp, deeplab)")
    p.add_argument("backbone", help=f"{', '.join(backbone_names())}, or timm:<name> (see 'cskd models')")
    p.add_argument("--size", nargs=2, type=int, default=(512, 1024), metavar=("H", "W"), help="input size")
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--no-aux", action="store_true", help="build without the auxiliary head")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        net = build_segmentor(args.model, args.backbone, args.num_classes, aux=False if args.no_aux else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    info = model_info(net, tuple(args.size))
    if args.json:
        print(json.dumps(info.__dict__, indent=2))
        return 0
    h, w = info.input_size
    rows = [
        ("model", f"{info.model} / {info.backbone}, {info.num_classes} classes"),
        ("input", f"1×3×{h}×{w}"),
        ("parameters", f"{info.params / 1e6:.2f} M ({info.params_without_aux / 1e6:.2f} M without the aux head)"),
        ("GFLOPs, forward", f"{info.gflops + info.gflops_aux:.1f} with the aux head (training), "
                            f"{info.gflops:.1f} without (inference)"),
        ("output stride", f"{info.output_stride} (logits {info.logits_size[0]}×{info.logits_size[1]})"),
        ("feature channels", f"{info.feature_channels} (the map before the classifier, used by distillation)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
