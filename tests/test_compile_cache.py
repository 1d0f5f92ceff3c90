"""The persistent compile cache: its key, its folder, a corrupt file, and a save / load round trip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cskd.distributed import DistEnv
from cskd.engine.compile_cache import ARTIFACTS, CompileCache, cache_key, key_parts
from cskd.engine.config import config_from_dict

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def _keep_compile_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """activate() sets the inductor folder and the job id for the process: give both back after each test."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))
    if not os.environ["TORCHINDUCTOR_CACHE_DIR"]:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    config = getattr(torch.compiler, "config", None)
    keep = config is not None and hasattr(config, "job_id")
    job_id = config.job_id if keep else None
    yield
    # Not monkeypatch.setattr: its undo deletes the attribute of torch's config module, which then hides the
    # setting from every later compile in the process ("torch.compiler.config.job_id does not exist").
    if keep:
        config.job_id = job_id


def _cfg(tmp_path: Path, **model: object) -> object:
    return config_from_dict({
        "output_dir": str(tmp_path / "run"),
        "model": {"model": "deeplabv3", "backbone": "mobilenetv2", **model},
        "train": {"device": "cpu", "amp": "none", "compile": True, "compile_cache": str(tmp_path / "cache")},
    })


def _key(cfg: object, classes: int = 13) -> str:
    return cache_key(key_parts(cfg, torch.device("cpu"), classes, 2, 1))


def test_the_key_follows_the_graphs_not_the_weight_files(tmp_path: Path) -> None:
    base = _key(_cfg(tmp_path))
    assert _key(_cfg(tmp_path)) == base  # stable
    assert _key(_cfg(tmp_path, weights="a.pt", pretrained_base="b.pth")) == base  # same graphs
    assert _key(_cfg(tmp_path, backbone="resnet18")) != base  # a changed model never shares a folder
    assert _key(_cfg(tmp_path), classes=19) != base
    s2b = config_from_dict({**_cfg(tmp_path).to_dict(), "train": {**_cfg(tmp_path).to_dict()["train"],
                                                                  "dilated_convs": "space_to_batch"}})
    assert _key(s2b) != base  # other graphs; the default leaves the key as it was
    assert "dilated_convs" not in key_parts(_cfg(tmp_path), torch.device("cpu"), 13, 2, 1)
    train = _cfg(tmp_path).to_dict()["train"]
    row_taps = _key(config_from_dict({**_cfg(tmp_path).to_dict(), "train": {**train, "dilated_convs": "row_taps"}}))
    assert row_taps not in (base, _key(s2b))
    parts = key_parts(_cfg(tmp_path), torch.device("cpu"), 13, 2, 1)
    unfused = config_from_dict({**_cfg(tmp_path).to_dict(), "train": {**_cfg(tmp_path).to_dict()["train"],
                                                                      "teacher_conv_fusion": False}})
    assert _key(unfused) == base  # the CPU runs the teacher's plain convs either way
    assert parts["torch"] == torch.__version__ and parts["device"].startswith("cpu")


def test_auto_dilated_convs_key_as_what_they_resolve_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cskd.engine.compile_cache as cc

    monkeypatch.setattr(cc, "device_name", lambda device: str(device))  # no GPU needed to name one
    train = _cfg(tmp_path).to_dict()["train"]

    def parts(dilated: str, device: str) -> dict:
        cfg = config_from_dict({**_cfg(tmp_path).to_dict(), "train": {**train, "dilated_convs": dilated}})
        return key_parts(cfg, torch.device(device), 13, 2, 1)

    assert "dilated_convs" not in parts("auto", "cpu")  # auto is native on the CPU: the CPU keys stay as they were
    assert parts("auto", "cpu") == parts("native", "cpu")
    assert parts("auto", "cuda")["dilated_convs"] == "row_taps"
    assert parts("auto", "cuda") == parts("row_taps", "cuda")  # the same graphs share a folder
    assert parts("native", "cuda") != parts("auto", "cuda")


def test_a_compiled_runner_points_inductor_at_the_visible_folder(tmp_path: Path) -> None:
    from cskd.engine.runner import StepRunner

    cfg = _cfg(tmp_path)
    runner = StepRunner(cfg, 13, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), 2)
    cache = runner.compile_cache
    assert cache is not None and cache.folder.parent == (tmp_path / "cache").resolve()
    assert cache.key == _key(cfg)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache.folder / "inductor")
    assert (cache.folder / "key.json").is_file() and not cache.loaded
    off = config_from_dict({**cfg.to_dict(), "losses": [], "train": {**cfg.to_dict()["train"], "compile": False}})
    assert StepRunner(off, 13, runner.env, 2).compile_cache is None  # eager: nothing set


def test_a_corrupt_cache_file_is_one_warning_then_a_fresh_compile(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cache = CompileCache(tmp_path / "k", {"x": 1})
    cache.folder.mkdir(parents=True)
    for junk in (b"garbage", b"cskd-mega-cache-1\n" + b"\0" * 40):  # not ours; ours but cut / damaged
        cache.artifacts.write_bytes(junk)
        cache.activate()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("warning: compile cache") and "from scratch" in err[0]
        assert not cache.loaded and not cache.artifacts.exists()
        assert (cache.folder / f"{ARTIFACTS}.bad").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")) or not hasattr(torch.compiler, "save_cache_artifacts"),
                    reason="inductor on the CPU needs a C++ compiler; the mega-cache needs torch ≥ 2.6")
def test_saved_artifacts_preload_a_new_process(tmp_path: Path) -> None:
    """Compile a one-kernel function in a process, save; a second process pre-loads the file and compiles nothing."""
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from cskd.engine.compile_cache import CompileCache\n"
        "from torch._dynamo.utils import counters\n"
        "c = CompileCache(Path(sys.argv[1]), {'x': 1}); c.activate()\n"
        "f = torch.compile(lambda x: (x * 2 + 1).relu())\n"
        "assert torch.equal(f(torch.arange(-4., 4.)), (torch.arange(-4., 4.) * 2 + 1).relu())\n"
        "print(c.loaded, c.save(), counters['inductor']['fxgraph_cache_miss'], flush=True)\n"
    )
    # TORCHINDUCTOR_VEC_ISA_OK=0: scalar C++ kernels. Without it, each process first builds and loads a probe
    # program per SIMD instruction set under the (here always fresh) inductor folder, about 10 s of each run's
    # 20 s on 2 cores; the probes are not part of the mega-cache this test is about.
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TORCHINDUCTOR_VEC_ISA_OK": "0"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    folder = tmp_path / "key"

    def run() -> list[str]:
        out = subprocess.run([sys.executable, "-c", script, str(folder)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    loaded, saved, misses = run()
    assert (loaded, saved) == ("False", "True") and int(misses) >= 1 and (folder / ARTIFACTS).is_file()
    shutil.rmtree(folder / "inductor")  # only the artifacts file is left, as on a fresh machine given the file
    loaded, _, misses = run()
    assert loaded == "True" and int(misses) == 0


def test_the_teachers_fusion_and_compile_scope_key_a_cuda_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cskd.engine.compile_cache as cc

    monkeypatch.setattr(cc, "device_name", lambda device: "a GPU")  # no CUDA needed to build the key
    cuda = torch.device("cuda")

    def key(distill: bool = True, **train: object) -> str:
        raw = _cfg(tmp_path).to_dict()
        if distill:
            raw |= {"teacher": {"model": "deeplabv3", "backbone": "resnet18"}, "losses": [{"name": "cwd"}]}
        return cache_key(key_parts(config_from_dict({**raw, "train": {**raw["train"], **train}}), cuda, 13, 2, 1))

    assert key() != key(teacher_conv_fusion=False)  # the default fuses on CUDA: other graphs
    assert key(teacher_conv_fusion=False) == key(teacher_conv_fusion=False)
    assert key(teacher_conv_fusion=False) != key(teacher_conv_fusion=False, teacher_precision="fp8")
    assert key(teacher_precision="fp8") == key(teacher_conv_fusion=False, teacher_precision="fp8")  # fp8: no fusion
    assert key(distill=False) == key(distill=False, teacher_conv_fusion=False)  # no teacher: nothing to fuse
    assert key(teacher_compile="head") != key()  # only the teacher's heads compiled: other graphs
    assert key(teacher_compile="whole") == key()  # the default leaves every earlier key as it was
    assert key(teacher_graph=False) == key()  # a graph replays the compiled kernels: the same graphs
    assert key(distill=False, teacher_compile="head") == key(distill=False)  # no teacher: nothing to compile

