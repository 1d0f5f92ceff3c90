"""Shared test set-up: deterministic, single-threaded-ish CPU runs; tests/ on sys.path for helper modules.

The thread count is pinned for this process and, through OMP_NUM_THREADS, for every process a test starts
(subprocesses, spawned workers): float sums on the CPU are ordered by the thread count, so a test that compares
numbers between processes compares like with like on any machine (a 16-core one included)."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
