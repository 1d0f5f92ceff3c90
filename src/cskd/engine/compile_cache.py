"""A persistent, visible torch.compile cache, one folder per (torch, device, model/method) key.

``train.compile_cache`` (default ``~/.cache/cskd/compile``, or ``$XDG_CACHE_HOME/cskd/compile``) holds one folder
per key; a compiled run points ``TORCHINDUCTOR_CACHE_DIR`` at ``<root>/<key>/inductor`` before its first compile, so
inductor's FX-graph and AOTAutograd caches, the Triton kernels (``inductor/triton``) and the autotuning results
outlive the machine's /tmp and the next run of the same config skips the compile work. Besides, the run writes
torch's "mega-cache" (:func:`torch.compiler.save_cache_artifacts`) as ``<key>/artifacts.bin`` after its first
compiled steps: one portable file that pre-loads every one of those caches (copy the folder to another machine of
the same kind). ``<key>/key.json`` says what the key was made of.

Why a key although inductor's graph cache is content-addressed (its entries are keyed by the graph, the input
metadata, the torch version and the device, so a changed model cannot pick a wrong compiled graph even in a
shared folder):

- the mega-cache file and dynamo's profile-guided dynamic-shape decisions (PGO, stored under the job id that this
  module sets to the key) are *not* content-addressed: PGO is keyed by job id and source location, so a changed
  model or crop size sharing a job id would start from another config's "this dimension is dynamic" decisions, and
  one artifacts file per folder would be loaded into (and re-saved over by) a run of another model;
- one folder per config can be inspected, measured and deleted on its own.

The key covers the torch / Triton / CUDA versions, the device name, cskd's version and everything in the config
that shapes the compiled graphs (model, teacher, losses, precision, memory format, compile modes, per-device batch,
crop size, classes, world size).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..checkpoints.files import atomic_write

ARTIFACTS = "artifacts.bin"
_MAGIC = b"cskd-mega-cache-1\n"
"""The file: this line, the SHA-256 of the payload, then torch's bytes. Torch's own loader logs a traceback (and
carries on) on bytes it cannot read; the checksum lets a cut or damaged file be caught here, in one line."""


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cskd" / "compile"


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"{device.type}-{platform.machine()}"


def key_parts(
    cfg: Any, device: torch.device, num_classes: int, batch_per_device: int, world_size: int
) -> dict[str, Any]:
    """What the key is made of (written to ``key.json``)."""
    try:
        import triton  # noqa: PLC0415

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    config = cfg.to_dict()
    train = config["train"]
    # Where the weights come from does not change a graph: a new checkpoint to start from keeps its cache.
    nets = {block: {k: v for k, v in (config[block] or {}).items() if k not in ("weights", "pretrained_base")}
            for block in ("model", "teacher")}
    return {
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "device": device_name(device), "cskd": __version__, "python": platform.python_version(),
        "model": nets["model"], "teacher": nets["teacher"] if config["losses"] else None,
        "losses": config["losses"],
        "train": {k: train[k] for k in ("amp", "channels_last", "compile_mode", "loss_compile_mode", "aux_weight",
                                        "optimizer", "sync_bn")},
        # only when set, so that the keys of every amp run (the default) stay what they were
        **({"teacher_precision": train["teacher_precision"]}
           if train.get("teacher_precision", "amp") != "amp" else {}),
        **({"dilated_convs": dilated} if (dilated := cfg.train.resolved_dilated_convs(device)) != "native" else {}),
        **({"fused_maxpool": True} if cfg.train.fuses_maxpool(device) else {}),
        # a fused teacher is other graphs; keyed, like the teacher itself, only when there is one
        **({"teacher_conv_fusion": True} if config["losses"] and cfg.train.fuses_teacher_epilogues(device) else {}),
        **({"teacher_compile": train["teacher_compile"]}
           if config["losses"] and train.get("teacher_compile", "whole") != "whole" else {}),
        "crop_size": config["data"]["crop_size"], "num_classes": num_classes,
        "batch_per_device": batch_per_device, "world_size": world_size,
    }


def cache_key(parts: dict[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _payload(data: bytes) -> bytes:
    """Torch's bytes from an artifacts file, checked against the stored checksum."""
    head, digest, body = data[:len(_MAGIC)], data[len(_MAGIC):len(_MAGIC) + 32], data[len(_MAGIC) + 32:]
    if head != _MAGIC:
        raise ValueError("not a cskd compile-cache file")
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch (cut short or damaged)")
    return body


@dataclass
class CompileCache:
    """The cache folder of one key; :meth:`activate` before compiling, :meth:`save` after compiled steps."""

    folder: Path
    parts: dict[str, Any]
    loaded: bool = False
    """Whether an artifacts file was pre-loaded at activation."""

    @classmethod
    def for_run(cls, root: str | Path, cfg: Any, device: torch.device, num_classes: int, batch_per_device: int,
                world_size: int) -> CompileCache:
        parts = key_parts(cfg, device, num_classes, batch_per_device, world_size)
        return cls(Path(root).expanduser().resolve() / cache_key(parts), parts)

    @property
    def key(self) -> str:
        return self.folder.name

    @property
    def artifacts(self) -> Path:
        return self.folder / ARTIFACTS

    def activate(self) -> None:
        """Point inductor (and with it Triton and PGO) at this folder and pre-load its artifacts file if any. A file
        that does not load (cut short, another torch's) costs one warning line and is moved aside; the run then
        compiles from scratch."""
        (self.folder / "inductor").mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.exists():
            key_file.write_text(json.dumps(self.parts, indent=2, sort_keys=True, default=str) + "\n")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.folder / "inductor")
        config = getattr(torch.compiler, "config", None)
        if config is not None and hasattr(config, "job_id"):
            config.job_id = f"cskd-{self.key}"  # PGO profiles per key (see the module's docs)
        self.loaded = False
        if not self.artifacts.is_file() or not hasattr(torch.compiler, "load_cache_artifacts"):
            return
        try:
            info = torch.compiler.load_cache_artifacts(_payload(self.artifacts.read_bytes()))
            self.loaded = info is not None
        except Exception as e:  # noqa: BLE001 - any failure to load only means compiling from scratch
            _warn(f"compile cache {self.artifacts} did not load ({type(e).__name__}: {str(e)[:120]}); moved aside "
                  "as artifacts.bin.bad, compiling from scratch")
            try:
                os.replace(self.artifacts, self.artifacts.with_suffix(".bin.bad"))
            except OSError:
                pass

    def save(self) -> bool:
        """Write the mega-cache of everything compiled so far, atomically (a temporary file renamed over the old
        one). Returns whether a file was written; a failure is one warning line, never an error."""
        if not hasattr(torch.compiler, "save_cache_artifacts"):
            return False
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                return False
            data = _MAGIC + hashlib.sha256(saved[0]).digest() + saved[0]
            if self.artifacts.is_file() and self.artifacts.stat().st_size > len(data):
                return False  # a run that found everything cached may know less than the file already holds
            atomic_write(self.artifacts, lambda f: f.write(data))
            return True
        except Exception as e:  # noqa: BLE001 - the cache is an optimisation; the run goes on without it
            _warn(f"compile cache {self.artifacts} not saved ({type(e).__name__}: {str(e)[:120]})")
            return False


__all__ = ["ARTIFACTS", "CompileCache", "cache_key", "default_root", "device_name", "key_parts"]
