"""Errors raised inside DataLoader worker processes, given back as the one-line error of ``workers: 0``.

PyTorch re-raises an exception from a worker in the main process as the same type, but with the worker's whole
traceback as its message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), so a
bad file would be named only on the last of ~30 lines. :func:`iterate` (wrapped around every loader cskd iterates)
and :func:`unwrap` (applied by the CLI to whatever reaches it) restore the original message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TypeVar

from ..errors import CskdError

T = TypeVar("T")

_HEADER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def unwrap(error: BaseException) -> BaseException:
    """For a cskd error re-raised from a DataLoader worker: the same type with the original message; any other
    exception unchanged."""
    text = str(error)
    if not isinstance(error, CskdError) or not _HEADER.match(text):
        return error
    cls = type(error)
    # The traceback ends with "<module>.<Type>: <message>" (format_exception_only), the message possibly on
    # several lines; take what follows the last such line.
    names = {cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"}
    best = -1
    for name in names:
        for m in re.finditer(rf"(?m)^{re.escape(name)}: ", text):
            best = max(best, m.end())
    if best < 0:
        return error
    try:
        clean = cls(text[best:].rstrip("\n"))
    except Exception:  # an error type with another constructor: keep it as it came  # noqa: BLE001
        return error
    clean.__cause__ = None
    clean.__suppress_context__ = True
    return clean


def iterate(loader: Iterable[T]) -> Iterator[T]:
    """Iterate ``loader``; a cskd error from one of its workers is raised as the one-line original."""
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except CskdError as e:
            _stop_workers(it)
            clean = unwrap(e)
            if clean is e:
                raise
            raise clean from None
        yield item


def _stop_workers(it: object) -> None:
    """Stop a failed loader's worker processes now. The re-raised error's traceback holds the iterator in a
    reference cycle, and the garbage collector's later shutdown waits up to 5 s per worker in whatever runs then."""
    shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process loader iterator
    if callable(shutdown):
        shutdown()


__all__ = ["iterate", "unwrap"]
