"""Checkpoint files: written atomically, read safely, holding everything an exact resume needs.

A write goes to a temporary file in the same folder, is fsync'ed, then renamed over the target (and the folder
fsync'ed): a crash or a full disk mid-write leaves the previous file intact. Every read goes through :func:`safe_load`,
i.e. ``torch.load(..., weights_only=True)``: a checkpoint holds tensors and plain containers, and a file that would
need to unpickle arbitrary objects (and could run code doing so) is refused. RNG states are saved as tensors and
plain containers so that :func:`safe_load` reads them back.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import CheckpointError, first_line


def safe_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers, on the CPU, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file contains Python objects other than tensors and plain containers, "
            f"and unpickling them could run code ({first_line(e)}). Re-save only the state dict "
            "(torch.save(model.state_dict(), path)) from code you trust."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({first_line(e)}); the file is truncated or not a PyTorch "
            "checkpoint. Copy it again or point to another file."
        ) from None


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a temporary file in ``path``'s folder, fsync it, then rename it over ``path``. Any failure
    (a full disk, a read-only folder, a directory where the file should be, Ctrl-C) removes the temporary file and
    leaves the previous file as it was; an OS error becomes a :class:`CheckpointError` naming the path."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way of the file", str(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({_os_reason(e)})") from None
    except RuntimeError as e:  # torch.save's zip writer reports a failed write (a full disk) as its own error
        cause = e.__context__ or e.__cause__
        if isinstance(cause, OSError):
            raise CheckpointError(f"{path}: cannot write the checkpoint ({_os_reason(cause)})") from None
        if "write" not in str(e).lower():
            raise
        raise CheckpointError(f"{path}: cannot write the checkpoint ({first_line(e)})") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or first_line(e)


def first_nonfinite(named: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor of ``named`` holding a NaN or an infinity, else None.

    One fused reduction and one host synchronisation: each tensor's ``isfinite().all()`` is stacked into one
    vector (per device) and read once; the offending name is looked up only when something is wrong."""
    items = [(k, t) for k, t in named.items() if t.is_floating_point() or t.is_complex()]
    if not items:
        return None
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(items):
        by_device.setdefault(t.device, []).append(i)
    flags = torch.empty(len(items), dtype=torch.bool)
    finite = True
    for device, idx in by_device.items():
        with torch.no_grad():
            ok = torch.stack([torch.isfinite(items[i][1].detach()).all() for i in idx]).cpu()
        flags[idx] = ok
        finite = finite and bool(ok.all())
    if finite:
        return None
    return items[int((~flags).nonzero()[0])][0]


def named_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of nested dicts / lists, by dotted name (``optimizer.state.3.exp_avg``)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(named_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(named_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors / plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _python_state_to_tensor(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_python_state_from_tensor(state["python"]))
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def run_environment(device: torch.device | str) -> dict[str, Any]:
    """What an exact resume depends on besides the checkpoint: CPU float sums are ordered by the thread count,
    and kernels differ between devices."""
    return {"threads": torch.get_num_threads(), "device": str(device)}


def resume_difference(saved: dict[str, Any] | None, device: torch.device | str) -> str | None:
    """A note when this process differs from the one that wrote the checkpoint (``saved``: its
    :func:`run_environment`, absent in older checkpoints): the run goes on, but its losses will not be
    bit-identical to an uninterrupted run's."""
    if not saved:
        return None
    now = run_environment(device)
    diff = [f"{k} {saved[k]} → {now[k]}" for k in ("threads", "device") if k in saved and saved[k] != now[k]]
    if not diff:
        return None
    return ("note: resuming with " + ", ".join(diff) + " (the checkpoint's vs this process's); training goes on, "
            "but the losses will not be bit-identical to an uninterrupted run (set OMP_NUM_THREADS="
            f"{saved.get('threads')} and the same device for that)")


def _python_state_to_tensor(st: tuple) -> dict[str, Any]:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_tensor(d: dict[str, Any]) -> tuple:
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


__all__ = ["atomic_save", "atomic_write", "first_nonfinite", "named_tensors", "capture_rng", "restore_rng", "resume_difference", "run_environment", "safe_load"]
