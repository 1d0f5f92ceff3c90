"""``cskd models``: every registered backbone and head, with parameters and GFLOPs."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the registered backbones and heads with parameters and GFLOPs",
        description="List every registered backbone (stage widths and strides, published head widths, aux "
        "head and optimiser, parameters and GFLOPs of the backbone alone) and every head; --pairs adds every "
        "backbone × head segmentor. Models are built on the meta device (no memory, no weights). GFLOPs as in "
        "'cskd info': torch.utils.flop_counter, batch 1, a multiply-add = 2 FLOPs, inference path.",
    )
    p.add_argument("--size", nargs=2, type=int, default=(512, 1024), metavar=("H", "W"), help="input size")
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--pairs", action="store_true", help="also every backbone × head segmentor")
    p.add_argument("--timm", nargs="*", default=[], metavar="NAME", help="also these timm backbones (timm:NAME)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def collect(size: tuple[int, int], num_classes: int, pairs: bool, timm_names: list[str]) -> dict[str, Any]:
    from ..models import build_segmentor, count_flops, count_parameters
    from ..models.backbones import BACKBONES, backbone_defaults, build_backbone
    from ..models.heads import HEADS
    from ..models.segmentor import head_width

    shape = (1, 3, *size)
    names = sorted(BACKBONES) + [f"timm:{n}" for n in timm_names]
    backbones, segmentors = [], []
    for name in names:
        try:
            with torch.device("meta"):
                body = build_backbone(name)
            d = backbone_defaults(name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        backbones.append({
            "backbone": name,
            "stage channels": "/".join(map(str, body.out_channels)),
            "strides": "/".join(map(str, body.reductions)),
            "head widths": ", ".join(f"{h} {head_width(h, name)}" for h in sorted(HEADS)),
            "aux": f"stage {d.aux_stage}" if d.aux else "no",
            "optimiser": d.optimizer.describe() if d.optimizer else "the config's",
            "params (M)": round(count_parameters(body) / 1e6, 2),
            "GFLOPs": round(count_flops(body, shape) / 1e9, 1),
        })
        if pairs:
            for head in sorted(HEADS):
                try:
                    with torch.device("meta"):
                        net = build_segmentor(head, name, num_classes, aux=False)
                except ValueError as e:
                    segmentors.append({"model": head, "backbone": name, "params (M)": "-", "GFLOPs": "-",
                                       "output stride": str(e)})
                    continue
                segmentors.append({
                    "model": head, "backbone": name,
                    "params (M)": round(count_parameters(net) / 1e6, 2),
                    "GFLOPs": round(count_flops(net, shape, with_aux=False) / 1e9, 1),
                    "output stride": net.output_stride,
                })
    heads = [{
        "head": name,
        "class": e.cls.__name__,
        "default width": e.default_channels,
        "needs stages": e.min_stages,
        "output at": ("deepest stage" if e.output_stage == -1 else f"stage {e.output_stage}")
        + (f" / {e.stride_factor}" if e.stride_factor != 1 else ""),
        "aliases": ", ".join(e.aliases) or "-",
    } for name, e in sorted(HEADS.items())]
    return {"input_size": list(size), "backbones": backbones, "heads": heads, "segmentors": segmentors}


def run(args: argparse.Namespace) -> int:
    data = collect(tuple(args.size), args.num_classes, args.pairs, list(args.timm))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    h, w = data["input_size"]
    print(f"Backbones (alone, input 1×3×{h}×{w}):")
    print(_table(data["backbones"], ["backbone", "stage channels", "strides", "params (M)", "GFLOPs", "aux",
                                     "optimiser", "head widths"]))
    print("\nHeads:")
    print(_table(data["heads"], ["head", "class", "default width", "needs stages", "output at", "aliases"]))
    if data["segmentors"]:
        print(f"\nSegmentors ({args.num_classes} classes, without the aux head, input 1×3×{h}×{w}):")
        print(_table(data["segmentors"], ["model", "backbone", "params (M)", "GFLOPs", "output stride"]))
    print("\nAny timm model with features_only also works as backbone 'timm:<name>' (see --timm).")
    return 0
