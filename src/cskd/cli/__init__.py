"""The ``cskd`` command line: a thin layer over the library.

Each module in this package that defines ``register(subparsers)`` adds one or more subcommands; a subcommand's
parser sets ``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .. import __version__
from ..errors import CskdError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cskd",
        description="Knowledge distillation for semantic segmentation (CSKD and its peers).",
    )
    parser.add_argument("--version", action="version", version=f"cskd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CskdError as e:
        from ..data.workers import unwrap  # one line even where an error from a DataLoader worker was not unwrapped

        print(f"cskd {args.command}: error: {unwrap(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = "; run the same command again to continue (finished runs are reused, the interrupted one resumes)" \
            if args.command in ("compare", "demo") else ""
        print(f"cskd {args.command}: interrupted{again}", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
