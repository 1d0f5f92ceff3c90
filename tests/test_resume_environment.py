"""Exact resume needs the same thread count and device (issue #22 item 8): checkpoints record both, and a resume
under other ones says that its losses will not be bit-identical (it still resumes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_engine import tiny_config

from cskd.checkpoints.files import resume_difference, run_environment
from cskd.engine.config import config_from_dict
from cskd.engine.trainer import Trainer
from cskd.errors import CheckpointError
from cskd.checkpoints.files import safe_load


def test_resume_difference() -> None:
    here = run_environment("cpu")
    assert here == {"threads": torch.get_num_threads(), "device": "cpu"}
    assert resume_difference(here, "cpu") is None
    assert resume_difference(None, "cpu") is None  # a checkpoint from before this record
    note = resume_difference({"threads": here["threads"] + 14, "device": "cuda:0"}, "cpu")
    assert note and f"threads {here['threads'] + 14} → {here['threads']}" in note and "device cuda:0 → cpu" in note
    assert "bit-identical" in note and f"OMP_NUM_THREADS={here['threads'] + 14}" in note


def test_resume_under_another_thread_count_says_so(synth_root: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_config(synth_root, tmp_path / "run", None, save_every=1, budget={"iterations": 2})
    Trainer(config_from_dict(raw), progress=False).fit()
    assert safe_load(tmp_path / "run" / "last.pt")["environment"] == run_environment("cpu")
    raw["train"]["budget"] = {"iterations": 3}
    threads = torch.get_num_threads()
    capsys.readouterr()
    torch.set_num_threads(threads + 1)
    try:
        trainer = Trainer(config_from_dict(raw), resume="auto", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert trainer.iteration == 2
    assert f"threads {threads} → {threads + 1}" in capsys.readouterr().err
    raw["model"] = {"model": "deeplabv3", "backbone": "resnet18"}
    with pytest.raises(CheckpointError, match="different 'model' block"):  # another network: refused
        Trainer(config_from_dict(raw), resume="auto", progress=False)
