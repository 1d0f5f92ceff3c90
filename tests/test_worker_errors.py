"""Errors raised inside DataLoader workers reach the user as the same one-line error as with ``workers: 0``
(issue #22 item 3): training, ``cskd eval`` and ``cskd predict``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cskd.cli import main
from cskd.data import synthetic
from cskd.data.workers import iterate, unwrap
from cskd.engine.config import config_from_dict
from cskd.engine.trainer import Trainer
from cskd.errors import CheckpointError, DataError
from cskd.models import build_segmentor

SIZE = (32, 64)


class _BadAt(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 2:
            raise DataError(f"/data/x_{i}.png: image file is truncated; fix or remove it")
        return torch.zeros(1)


@pytest.mark.parametrize("workers", [0, 2])
def test_iterate_gives_the_original_message(workers: int) -> None:
    with pytest.raises(DataError) as e:
        list(iterate(DataLoader(_BadAt(), batch_size=1, num_workers=workers)))
    assert str(e.value) == "/data/x_2.png: image file is truncated; fix or remove it"


def test_unwrap_leaves_other_errors_alone() -> None:
    plain = DataError("a.png: corrupt")
    assert unwrap(plain) is plain
    other = RuntimeError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...")
    assert unwrap(other) is other
    wrapped = CheckpointError("Caught CheckpointError in DataLoader worker process 3.\nOriginal Traceback (most "
                              "recent call last):\n  File \"x.py\", line 1, in f\ncskd.errors.CheckpointError: "
                              "m.pt: truncated\n  on two lines\n")
    out = unwrap(wrapped)
    assert type(out) is CheckpointError and str(out) == "m.pt: truncated\n  on two lines"


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(root, 6, 3, SIZE, seed=0, workers=1)
    for split in ("train", "val"):
        img = sorted((root / "leftImg8bit" / split).rglob("*.png"))[1]
        img.write_bytes(img.read_bytes()[:200])  # truncated
    return root


def _train_error(root: Path, out: Path, workers: int) -> str:
    raw = {"name": "w", "output_dir": str(out), "model": {"model": "deeplabv3", "backbone": "mobilenetv2"},
           "data": {"dataset": "synthscapes", "root": str(root), "crop_size": list(SIZE), "workers": workers},
           "train": {"budget": {"iterations": 4}, "batch_size": 3, "log_every": 1, "val_every": 1000,
                     "save_every": 1000, "device": "cpu", "amp": "none"}}
    with pytest.raises(DataError) as e:
        Trainer(config_from_dict(raw), progress=False).fit()
    return str(e.value)


def test_training_error_from_a_worker_is_the_workers_0_line(bad_tree: Path, tmp_path: Path) -> None:
    inline = _train_error(bad_tree, tmp_path / "w0", 0)
    from_workers = _train_error(bad_tree, tmp_path / "w2", 2)
    assert "\n" not in from_workers and "Traceback" not in from_workers
    assert from_workers == inline and "_leftImg8bit.png" in inline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cskd.data import dataset_info

    torch.manual_seed(0)
    net = build_segmentor("deeplabv3", "mobilenetv2", dataset_info("synthscapes").num_classes).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save({"model": net.state_dict(), "spec": net.spec.to_dict()}, path)
    return path


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_cli_error_from_a_worker_is_the_workers_0_line(bad_tree: Path, checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], command: str) -> None:
    def run(workers: int) -> str:
        if command == "eval":
            argv = ["eval", str(checkpoint), "--dataset", "synthscapes", "--data-root", str(bad_tree),
                    "--out", str(tmp_path / f"e{workers}")]
        else:
            argv = ["predict", str(checkpoint), str(bad_tree), "--dataset", "synthscapes", "--split", "val",
                    "--out", str(tmp_path / f"p{workers}")]
        capsys.readouterr()
        assert main([*argv, "--device", "cpu", "--workers", str(workers), "--no-progress"]) == 1
        return capsys.readouterr().err

    inline, from_workers = run(0), run(2)
    assert from_workers == inline
    assert from_workers.count("\n") == 1 and from_workers.startswith(f"cskd {command}: error: ")
    assert "_leftImg8bit.png" in from_workers
