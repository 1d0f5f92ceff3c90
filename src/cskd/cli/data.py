"""``cskd data synth`` (generate the synthetic street scenes) and ``cskd data check`` (scan a dataset split)."""

from __future__ import annotations

import argparse
import sys

from ..data.datasets import DATASETS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate the synthetic dataset, or check a dataset on disk",
                       description="Dataset utilities.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    s = dsub.add_parser(
        "synth", help="generate synthetic street scenes (Cityscapes layout)",
        description="Render seeded street scenes with exact labels into OUT in the Cityscapes layout (dataset name "
        "'synthscapes'); any previous synthscapes tree in OUT is replaced. Prints the class pixel frequencies.")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    s.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    s.add_argument("--size", nargs=2, type=int, default=(256, 512), metavar=("H", "W"), help="image size")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    s.add_argument("--if-missing", action="store_true",
                   help="do nothing when OUT already holds exactly these parameters")
    s.set_defaults(func=run_synth)

    c = dsub.add_parser(
        "check", help="decode a whole split and report missing, corrupt or mislabelled files",
        description="Decode every image and label of a split as the loader would and report: missing labels, "
        "unreadable images, label values outside the dataset's ids, image/label size mismatches; plus class "
        "pixel frequencies and image sizes (--quick: headers only). Exit status 1 when a problem is found.")
    c.add_argument("dataset", choices=sorted(DATASETS))
    c.add_argument("root", help="dataset root folder")
    c.add_argument("--split", default="train")
    c.add_argument("--quick", action="store_true",
                   help="read file headers only (seconds): missing/unidentifiable files, size mismatches, RGB labels")
    c.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    c.set_defaults(func=run_check)


def _progress(label: str):  # noqa: ANN202 - returns a callback
    from tqdm import tqdm

    bar: list[tqdm] = []

    def update(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=label, unit="img", file=sys.stderr, disable=not sys.stderr.isatty()))
        bar[0].update(done - bar[0].n)
        if done == total:
            bar[0].close()

    return update


def run_synth(args: argparse.Namespace) -> int:
    from ..data import synthetic

    size = tuple(args.size)
    manifest = synthetic.read_manifest(args.out) if args.if_missing else None
    if manifest is not None and synthetic.matches(manifest, args.train, args.val, size, args.seed):
        print(f"{args.out}: already holds these scenes; nothing to do")
    else:
        manifest = synthetic.generate(args.out, args.train, args.val, size, args.seed, args.workers,
                                      progress=_progress("synth"))
        n = args.train + args.val
        print(f"wrote {n} scenes of {size[0]}×{size[1]} to {args.out} in {manifest['seconds']:.1f} s "
              f"({n / max(manifest['seconds'], 1e-9):.1f} images/s, {manifest['workers']} workers)")
    print("class pixel frequencies:")
    print(synthetic.format_frequencies(manifest))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from ..data.check import check_split

    report = check_split(args.dataset, args.root, args.split, quick=args.quick, workers=args.workers,
                         progress=_progress("check"))
    print(report.format())
    return 0 if report.ok else 1
