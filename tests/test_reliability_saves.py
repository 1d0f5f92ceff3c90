"""Issue #22 items 1, 2 and 6: no checkpoint with non-finite tensors, one run per output folder, one-line save
errors (a directory in the way, a full disk, a read-only folder, Ctrl-C during a save)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import cskd.checkpoints.files as files
from cskd.checkpoints import safe_load
from cskd.cli import main
from cskd.engine.config import config_from_dict
from cskd.engine.trainer import Trainer
from cskd.errors import TrainingError

from test_engine import tiny_config

SRC = Path(__file__).resolve().parents[1] / "src"


def write_config(tmp_path: Path, root: Path, out: Path, **train: object) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(root, out, **train)))
    return path


def every_tensor_is_finite(path: Path) -> None:
    for name, t in files.named_tensors(safe_load(path)).items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{path.name}: {name} is not finite"


def one_line_error(err: str) -> str:
    """The one line of the error (the run's banner and progress lines come before it)."""
    lines = [line for line in err.splitlines() if line.startswith("cskd ") and ": error: " in line
             or "interrupted" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ item 1


def test_first_nonfinite_names_the_first_bad_floating_tensor() -> None:
    named = {"a": torch.ones(3), "n": torch.tensor([1, 2]), "b": torch.tensor([1.0, float("inf")]),
             "c": torch.tensor(float("nan"))}
    assert files.first_nonfinite(named) == "b"
    assert files.first_nonfinite({"a": torch.ones(2), "i": torch.arange(3)}) is None
    tree = {"model": {"w": torch.ones(1)}, "optimizer": {"state": {0: {"momentum_buffer": torch.ones(1)}}}}
    assert set(files.named_tensors(tree)) == {"model.w", "optimizer.state.0.momentum_buffer"}


def test_huge_lr_stops_and_no_checkpoint_holds_non_finite_tensors(synth_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path, synth_root, out, budget={"iterations": 4}, save_every=1, val_every=1)
    rc = main(["train", str(cfg), "--set", "train.lr=1.0e+38", "--no-progress"])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 1 and "non-finite" in line and "iteration" in line, line
    written = sorted(out.glob("*.pt"))
    for path in written:  # every tensor of every file that was written
        every_tensor_is_finite(path)
    assert not list(out.glob(".*.tmp"))


def test_nan_in_a_parameter_before_a_save_leaves_the_previous_last_pt_byte_identical(
        synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "run", budget={"iterations": 3}, save_every=1))
    trainer = Trainer(cfg, progress=False)
    before: dict[str, bytes] = {}
    real_state = Trainer._state

    def poisoned(self: Trainer) -> dict:
        if self.iteration == 2:
            before["last"] = (self.run_dir / "last.pt").read_bytes()
            with torch.no_grad():
                dict(self.student.named_parameters())["backbone.conv1.weight" if hasattr(self.student.backbone, "conv1")
                                                      else next(n for n, _ in self.student.named_parameters())
                                                      ].view(-1)[0] = float("nan")
        return real_state(self)

    monkeypatch.setattr(Trainer, "_state", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite weights at iteration 2 \(first: model\.") as e:
        trainer.fit()
    assert "last.pt is intact" in str(e.value)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before["last"]
    every_tensor_is_finite(tmp_path / "run" / "last.pt")


def test_non_finite_optimizer_state_is_named(synth_root: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = config_from_dict(tiny_config(synth_root, tmp_path / "run", budget={"iterations": 2}, save_every=1,
                                       optimizer="adamw", lr=1e-3))
    trainer = Trainer(cfg, progress=False)
    real_state = Trainer._state

    def poisoned(self: Trainer) -> dict:
        state = real_state(self)
        if self.iteration == 2:
            first = next(iter(state["optimizer"]["state"].values()))
            first["exp_avg"] = torch.full_like(first["exp_avg"], float("inf"))
        return state

    monkeypatch.setattr(Trainer, "_state", poisoned)
    with pytest.raises(TrainingError, match="optimizer state of parameter"):
        trainer.fit()


# ------------------------------------------------------------------------------------------------ item 2


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg_path = write_config(tmp_path, synth_root, out)
    holder = Trainer(config_from_dict(tiny_config(synth_root, out)), progress=False)  # holds the lock, this process
    (out / "log.jsonl").write_text("the first run's log\n")
    res = subprocess.run([sys.executable, "-m", "cskd", "train", str(cfg_path), "--no-progress"], env=_env(),
                         capture_output=True, text=True, timeout=300)
    line = one_line_error(res.stderr)
    assert res.returncode == 1
    assert f"pid {os.getpid()}" in line and socket.gethostname() in line and str(out) in line, line
    assert (out / "log.jsonl").read_text() == "the first run's log\n"  # untouched
    assert not (out / "last.pt").exists()
    holder.fit()  # the holder goes on, then releases the lock
    assert (out / "last.pt").is_file()


def test_kill_minus_nine_of_the_holder_leaves_no_stale_lock(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from cskd.engine.runlock import RunLock; "
            "RunLock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=rf"in use by another cskd run \(pid {proc.pid} on host"):
            Trainer(config_from_dict(tiny_config(synth_root, out)), progress=False)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / ".lock").exists()  # the file stays; the OS released the lock with the process
    result = Trainer(config_from_dict(tiny_config(synth_root, out)), progress=False).fit()
    assert result.iterations == 2
    resumed = Trainer(config_from_dict(tiny_config(synth_root, out)), resume="auto", progress=False)  # --resume too
    assert resumed.resumed_from == out / "last.pt" and resumed.fit().iterations == 2


# ------------------------------------------------------------------------------------------------ item 6


def test_a_directory_where_last_pt_should_be(synth_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    (out / "last.pt").mkdir(parents=True)
    cfg = write_config(tmp_path, synth_root, out, save_every=1)
    rc = main(["train", str(cfg), "--overwrite", "--no-progress"])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 1 and f"{out / 'last.pt'}: cannot write the checkpoint" in line, line
    assert not list(out.glob(".*.tmp"))


def _fail_second_save(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    real = files.torch.save
    calls = []

    def save(obj, f, *a, **k):  # noqa: ANN001, ANN002, ANN003
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise exc
        return real(obj, f, *a, **k)

    monkeypatch.setattr(files.torch, "save", save)


def test_disk_full_during_a_save(synth_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path, synth_root, out, save_every=1)
    _fail_second_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    rc = main(["train", str(cfg), "--no-progress"])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 1, line
    assert f"{out / 'best.pt'}: cannot write the checkpoint (no space left on the device)" in line  # 2nd save
    assert "last.pt is intact" in line and "--resume" in line
    assert not list(out.glob(".*.tmp"))
    assert safe_load(out / "last.pt")["iteration"] == 1


def test_ctrl_c_during_a_save_exits_130_and_keeps_the_previous_checkpoint(
        synth_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path, synth_root, out, save_every=1)
    _fail_second_save(monkeypatch, KeyboardInterrupt())
    rc = main(["train", str(cfg), "--no-progress"])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 130 and "interrupted" in line and "is intact" in line, line
    assert f"cskd train {out / 'config.yaml'} --resume" in line
    assert not list(out.glob(".*.tmp"))
    assert safe_load(out / "last.pt")["iteration"] == 1
    monkeypatch.undo()
    assert main(["train", str(out / "config.yaml"), "--resume", "--no-progress"]) == 0  # the hint works


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_read_only_folder(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config_from_dict(tiny_config(synth_root, out, save_every=1))
    trainer = Trainer(cfg, progress=False)
    trainer._open_records().close()
    out.chmod(0o500)
    try:
        with pytest.raises(TrainingError, match="cannot write the checkpoint"):
            trainer.save("last.pt")
    finally:
        out.chmod(0o700)


def test_a_real_full_file_system(synth_root: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("no small file system can be mounted here (needs root and mount rights)")
    try:
        cfg = config_from_dict(tiny_config(synth_root, mnt / "run", save_every=1))
        with pytest.raises(TrainingError, match="cannot write the checkpoint"):
            Trainer(cfg, progress=False).fit()
        assert not list((mnt / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
