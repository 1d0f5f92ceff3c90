"""One run per output folder: an exclusive, non-blocking OS lock on ``<run_dir>/.lock``.

The lock is a POSIX record lock, ``fcntl.lockf`` (``msvcrt.locking`` on Windows): the operating system releases it
when the holder's process ends, however it ends, so a ``kill -9`` never leaves a stale lock behind. Not
``fcntl.flock``: a flock belongs to the open file, which forked DataLoader workers share, so workers outliving a
killed main process would keep the folder locked; a record lock belongs to the process and is not inherited. The file holds the holder's pid
and host, for the message that refuses a second run. Within one process the lock is shared (counted): a second
:class:`~cskd.engine.trainer.Trainer` on the same folder in the same process is the caller's own choice.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from ..errors import TrainingError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    try:
        import msvcrt
    except ImportError:
        msvcrt = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

_held: dict[str, list] = {}
"""Resolved folder → [file descriptor, count] for the locks this process holds."""


class RunInUseError(TrainingError):
    """Another process holds the output folder's lock."""


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:  # held: EAGAIN / EACCES; else (a file system without locks) go on unlocked
            return e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
    if msvcrt is not None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    return True  # no locking primitive on this platform: unlocked (documented)


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "a process whose pid could not be read"


class RunLock:
    """The lock of one output folder, held from :meth:`acquire` to :meth:`release` (idempotent)."""

    def __init__(self, key: str) -> None:
        self._key: str | None = key

    @classmethod
    def acquire(cls, run_dir: Path, command: str = "cskd") -> RunLock:
        run_dir.mkdir(parents=True, exist_ok=True)
        key = str(run_dir.resolve())
        if key in _held:
            _held[key][1] += 1
            return cls(key)
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise RunInUseError(
                f"{run_dir} is in use by another cskd run ({_holder(path)}); wait for it to end or stop it, "
                "or choose another --output-dir"
            )
        info = f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (info + "\n").encode(), 0) if hasattr(os, "pwrite") else os.write(fd, info.encode())
        except OSError:
            pass  # the lock holds without its note
        _held[key] = [fd, 1]
        return cls(key)

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key not in _held:
            return
        entry = _held[key]
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[key]
            os.close(entry[0])  # closing the descriptor releases the lock


__all__ = ["LOCK_NAME", "RunInUseError", "RunLock"]
