"""Shared test set-up: deterministic, single-threaded-ish CPU runs; tests/ on sys.path for helper modules.

The thread count is pinned for this process and, through OMP_NUM_THREADS, for every process a test starts
(subprocesses, spawned workers): float sums on the CPU are ordered by the thread count, so a test that compares
numbers between processes compares like with like on any machine (a 16-core one included).

Shared fixtures: ``synth_root``, the synthetic data set the engine tests train on."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small Synthscapes tree (12 train / 3 val images, 32×64, seed 0) for every test that trains or evaluates on
    synthetic data: generated once per session instead of once per module. Read-only: a test that changes files
    (truncates an image, adds a split) builds its own tree."""
    from cskd.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, n_train=12, n_val=3, size=(32, 64), seed=0, workers=1)
    return root
