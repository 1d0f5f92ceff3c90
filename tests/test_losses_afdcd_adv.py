"""Af-DCD and the adversarial term: formulas against float64 references written here, agreement with the authors'
published code (numbers in tests/data/{afdcd,adv}_reference.pt, computed by running their code from a scratch copy
on the same inputs and weights), the second-optimiser protocol of the engine (kill -9 and resume, a diverging
discriminator), bad hyper-parameters, and 2-iteration engine runs of afdcd, skd, ifvd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cskd.engine.auxiliary import AuxiliaryOptimizers
from cskd.engine.config import config_from_dict
from cskd.engine.records import read_records
from cskd.engine.trainer import Trainer
from cskd.errors import ConfigError, TrainingError
from cskd.losses import build_loss
from cskd.losses.adv import AdversarialLoss
from cskd.losses.afdcd import omni_contrastive_loss
from cskd.losses.base import register_loss
from cskd.losses.methods import METHODS
from cskd.checkpoints.files import safe_load
from cskd.models.segmentor import SegOutput

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(Path(__file__).parent))
from reference_weights import deterministic_state  # noqa: E402

R18 = (64, 128, 256, 512)
R101 = (256, 512, 1024, 2048)


def afdcd(cs=8, ct=32, **params):
    """The loss on a one-stage backbone pair (stage 1) of widths cs → ct, in float64."""
    return build_loss("afdcd", {"stage": 1, **params}, student_channels=4, teacher_channels=4, num_classes=3,
                      student_stage_channels=(cs,), teacher_stage_channels=(ct,)).double()


def outputs(fs, ft, k=3):
    b, _, h, w = fs.shape
    z = torch.zeros(b, k, h, w, dtype=fs.dtype)
    return SegOutput(z, None, z, (fs,)), SegOutput(z, None, z, (ft,))


# ------------------------------------------------------------------------------------------------ Af-DCD


def reference_contrastive(y: torch.Tensor, t: torch.Tensor, m: int, tau: float, p: int) -> torch.Tensor:
    """The omni-contrastive term from its definition, loop by loop: per image, patch, position n and group g, the
    student's vector against every teacher vector of the patch; positive = same (n, g), negatives = other groups."""
    b, c, h, w = y.shape
    d = c // m
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        for pr in range(h // p):
            for pc in range(w // p):
                ys, ts, groups = [], [], []
                for r in range(p):
                    for q in range(p):
                        for g in range(m):
                            ys.append(y[i, g * d:(g + 1) * d, pr * p + r, pc * p + q])
                            ts.append(t[i, g * d:(g + 1) * d, pr * p + r, pc * p + q])
                            groups.append(g)
                for a in range(len(ys)):
                    sims = [-(ys[a] - ts[j]).abs().sum() / tau for j in range(len(ts))
                            if j == a or groups[j] != groups[a]]
                    pos = -(ys[a] - ts[a]).abs().sum() / tau
                    total = total - (pos - torch.logsumexp(torch.stack(sims), 0))
    return total / (b * h * w)


def test_contrastive_term_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 8, 4, 8, generator=g, dtype=torch.float64)
    t = torch.randn(2, 8, 4, 8, generator=g, dtype=torch.float64)
    got = omni_contrastive_loss(y, t, groups=4, temperature=0.5, patch=(2, 2))
    assert torch.allclose(got, reference_contrastive(y, t, 4, 0.5, 2), rtol=1e-12)


def test_afdcd_loss_from_the_formula_with_identity_projector():
    """With the projector forced to the identity and equal widths: L_fd = ‖m⊙f_s − f_t‖²/B, L_ctr on the pooled
    maps; centre mask zeroes exactly the middle third."""
    loss = afdcd(cs=8, ct=8, groups=2, pool=2, patch=2, lambda_fd=1.0, lambda_ctr=1.0)
    loss.projector = torch.nn.Identity()
    assert isinstance(loss.align, torch.nn.Identity)  # equal widths: no connector (the published code fails here)
    g = torch.Generator().manual_seed(1)
    fs = torch.randn(2, 8, 6, 9, generator=g, dtype=torch.float64)
    ft = torch.randn(2, 8, 6, 9, generator=g, dtype=torch.float64)
    out = loss(*outputs(fs, ft))
    m = torch.ones(1, 1, 6, 9, dtype=torch.float64)
    m[..., 2:4, 3:6] = 0
    y = fs * m
    assert torch.allclose(out["afdcd_fd"], ((y - ft) ** 2).sum() / 2, rtol=1e-12)
    yp, tp = torch.nn.functional.max_pool2d(y, 2), torch.nn.functional.max_pool2d(ft, 2)  # 3×4 → cut to 2×4
    ref = reference_contrastive(yp[..., :2, :4], tp[..., :2, :4], 2, 0.07, 2)
    assert torch.allclose(out["afdcd_ctr"], ref, rtol=1e-10)


def test_random_mask_drops_the_published_share():
    loss = afdcd(cs=8, ct=8, groups=2, mask="random", mask_ratio=0.75)
    m = loss.make_mask(torch.zeros(64, 1, 32, 32, dtype=torch.float64))
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert abs(1 - m.mean().item() - 0.75) < 0.01


def _load_published_layout(loss, keys, state):
    mine = loss.state_dict()
    assert sorted(mine) == sorted(keys)
    loss.load_state_dict({k: state[k].to(mine[k].dtype) for k in keys})


@pytest.mark.parametrize("case, params", [
    ("enhanced_centre_pool", {"mask": "centre", "projector": "enhanced"}),
    ("plain_random_pool", {"mask": "random", "projector": "plain"}),
    ("enhanced_centre_camvid", {"mask": "centre", "projector": "enhanced", "contrast_region": "crop"}),
])
def test_afdcd_agrees_with_the_published_code(case, params):
    """tests/data/afdcd_reference.pt: the published OmniContrastiveFeatureLoss (losses/ocmgd.py) on the same
    seeded inputs and weights (reference_weights.deterministic_state over its keys), the same RNG seed for the
    random mask; loss values and the gradient of 2e-6·L_fd + 0.005·L_ctr with respect to the student's map."""
    ref = torch.load(DATA / "afdcd_reference.pt", weights_only=True)[case]
    seed = {"enhanced_centre_pool": 1, "plain_random_pool": 2, "enhanced_centre_camvid": 3}[case]
    shape = {"enhanced_centre_camvid": (45, 45)}.get(case, (16, 32))
    loss = afdcd(cs=8, ct=32, lambda_fd=1.0, lambda_ctr=1.0, **params)
    state = deterministic_state([(k, list(v.shape)) for k, v in
                                 _published_order(loss, ref["keys"]).items()], seed=seed)
    _load_published_layout(loss, ref["keys"], state)
    g = torch.Generator().manual_seed(100 + seed)
    fs = torch.randn(2, 8, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 32, *shape, generator=g, dtype=torch.float64).relu()
    torch.manual_seed(seed)
    out = loss(*outputs(fs, ft))
    (2e-6 * out["afdcd_fd"] + 0.005 * out["afdcd_ctr"]).backward()
    assert torch.allclose(out["afdcd_fd"], ref["fd"], rtol=1e-10)
    assert torch.allclose(out["afdcd_ctr"], ref["ctr"], rtol=1e-10)
    assert torch.allclose(fs.grad, ref["grad"], rtol=1e-8, atol=1e-14)


def _published_order(loss, keys):
    sd = loss.state_dict()
    return {k: sd[k] for k in keys}


@pytest.mark.parametrize("params, key", [
    ({"lambda_fd": -1.0}, "lambda_fd"),
    ({"lambda_ctr": -0.1}, "lambda_ctr"),
    ({"groups": 3}, "groups"),
    ({"stage": 5}, "stage"),
    ({"stage": 0}, "stage"),
    ({"temperature": 0.0}, "temperature"),
    ({"mask": "square"}, "mask"),
    ({"contrast_region": "corner"}, "contrast_region"),
])
def test_afdcd_bad_hyperparameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=key):
        build_loss("afdcd", params, student_channels=128, teacher_channels=256, num_classes=19,
                   student_stage_channels=R18, teacher_stage_channels=R101)


def test_afdcd_recipe_and_stage_widths():
    loss = build_loss("afdcd", {}, student_channels=128, teacher_channels=256, num_classes=19,
                      student_stage_channels=R18, teacher_stage_channels=R101)
    assert (loss.stage, loss.lambda_fd, loss.lambda_ctr, loss.temperature, loss.groups, loss.pool, loss.patch) == \
        (4, 2e-6, 0.005, 0.07, 16, 4, (4, 4))
    assert (loss.mask, loss.mask_ratio, loss.contrast_region, loss.clip_grad_norm) == ("centre", 0.75, "pool", 15.0)
    assert loss.align.in_channels == 512 and loss.align.out_channels == 2048
    assert [lc["name"] for lc in METHODS["afdcd"].losses] == ["kd", "afdcd"]
    with pytest.raises(ConfigError, match="student_stage_channels"):
        build_loss("afdcd", {}, student_channels=128, teacher_channels=256, num_classes=19)


# ------------------------------------------------------------------------------------------------ adversarial


def reference_sn_weight(w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mat = w.reshape(w.shape[0], -1)
    v = mat.T @ u
    v = v / (v.norm() + 1e-12)
    u2 = mat @ v
    u2 = u2 / (u2.norm() + 1e-12)
    return w / (u2 @ mat @ v), u2, v


def test_spectral_norm_and_hinge_from_the_formulas():
    from cskd.losses.adv import SpectralNormConv2d, hinge_discriminator_loss, hinge_generator_loss

    torch.manual_seed(0)
    conv = SpectralNormConv2d(3, 6, 4, 2, 1).double()
    u0 = conv.u.clone()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w, u, v = reference_sn_weight(conv.weight.detach(), u0)
    assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, w, conv.bias, 2, 1), rtol=1e-12)
    assert torch.allclose(conv.u, u) and torch.allclose(conv.v, v)
    assert torch.linalg.matrix_norm(w.reshape(6, -1), ord=2) < 1.5  # one power iteration: close to 1
    fake, real = torch.tensor([-2.0, 0.5]), torch.tensor([0.2, 3.0])
    assert hinge_generator_loss(fake) == -(-2.0 + 0.5) / 2
    assert torch.isclose(hinge_discriminator_loss(fake, real), torch.tensor((0.8 + 0.0) / 2 + (0.0 + 1.5) / 2))


def _adv_from_reference(**params):
    ref = torch.load(DATA / "adv_reference.pt", weights_only=True)
    loss = build_loss("adv", params, student_channels=4, teacher_channels=4, num_classes=5).double()
    state = deterministic_state([(k, s) for k, s in ref["keys"]], seed=7)
    for k in state:
        if k.endswith(".u") or k.endswith(".v"):
            state[k] = state[k] / state[k].norm()
    loss.discriminator.load_state_dict(state)
    return ref, loss


@pytest.mark.parametrize("vectors", ["published", "held"])
def test_adversarial_term_agrees_with_the_published_code(vectors):
    """tests/data/adv_reference.pt: the published Discriminator (utils/sagan.py, conv_dim 64), hinge criteria
    (losses/adv.py) and D optimiser (Adam 4e-4, β (0.9, 0.99)) of CIRKD's train_kd.py, one iteration in the
    published order; cskd's loss run through the engine's auxiliary-optimiser step. "held": the reference is the
    published code with its SpectralNorm changed (scratch copy only) to keep each call's u, v in that call's graph."""
    ref, loss = _adv_from_reference(spectral_vectors=vectors)
    suffix = "_held" if vectors == "held" else ""
    g = torch.Generator().manual_seed(11)
    zs = torch.randn(2, 5, 64, 64, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 5, 64, 64, generator=g, dtype=torch.float64)
    s, t = SegOutput(zs, None, zs), SegOutput(zt, None, zt)
    aux = AuxiliaryOptimizers({"adv": loss})
    assert list(aux.optimizers) == ["adv.discriminator"]
    opt = aux.optimizers["adv.discriminator"]
    assert opt.defaults["lr"] == 4e-4 and opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["weight_decay"] == 0
    adv_g = loss(s, t)["adv_g"]
    adv_g.backward()
    assert torch.allclose(adv_g, ref["adv_g"], rtol=1e-10)
    assert torch.allclose(zs.grad, ref["grad_zs"], rtol=1e-8, atol=1e-16)
    terms = aux.step(SegOutput(zs.detach(), None, zs), t, None)
    assert torch.allclose(terms["adv_d"], ref["adv_d"], rtol=1e-10)
    after = {**dict(loss.discriminator.named_parameters()), **dict(loss.discriminator.named_buffers())}
    for k, v in ref["after_state" + suffix].items():
        assert torch.allclose(after[k].detach(), v, rtol=1e-9, atol=1e-12), k
    with torch.no_grad():
        assert torch.allclose(loss.auxiliary_loss(s, t)["adv_d"], ref["adv_d2" + suffix], rtol=1e-9)


def test_discriminator_takes_maps_smaller_than_the_published_minimum():
    ref, loss = _adv_from_reference()
    assert ref["published_fails_on_45x45"]  # the published D cannot take CamVid's 45×45 logits
    z = torch.randn(2, 5, 45, 45, dtype=torch.float64)
    assert loss.discriminator(z).shape == (2, 1, 1, 1)
    assert loss.discriminator(torch.randn(2, 5, 4, 8, dtype=torch.float64)).shape == (2, 1, 1, 1)


@pytest.mark.parametrize("params, key", [
    ({"lambda_adv": -1.0}, "lambda_adv"), ({"lambda_d": -0.1}, "lambda_d"), ({"lr": 0.0}, "lr"),
    ({"beta2": 1.0}, "beta2"), ({"conv_dim": 7}, "conv_dim"), ({"spectral_vectors": "x"}, "spectral_vectors"),
])
def test_adversarial_bad_hyperparameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=key):
        build_loss("adv", params, student_channels=4, teacher_channels=4, num_classes=5)


def test_skd_and_ifvd_recipes_include_the_adversarial_term():
    names = {m: [lc["name"] for lc in METHODS[m].losses] for m in ("skd", "ifvd", "skd_noadv", "ifvd_noadv")}
    assert names == {"skd": ["kd", "skd", "adv"], "ifvd": ["kd", "ifvd", "adv"], "skd_noadv": ["kd", "skd"],
                     "ifvd_noadv": ["kd", "ifvd"]}
    adv = METHODS["skd"].losses[2]
    assert (adv["lambda_adv"], adv["lambda_d"]) == (0.001, 0.1)


# ------------------------------------------------------------------------------------------------ the engine

TINY = (32, 64)


def tiny(root: Path, out: Path, method: str | None = None, losses: list | None = None, **train: object) -> dict:
    # A MobileNetV2 student, as test_engine's tiny_config (which this module's DDP test uses) and one of Af-DCD's
    # published students (320 → the teacher's stage width through its connector): the runs check the recipes'
    # terms and the second optimiser, not the student; its checkpoints are 4× smaller than a ResNet-18's.
    cfg = {
        "name": "tiny", "output_dir": str(out),
        "data": {"dataset": "synthscapes", "root": str(root), "crop_size": list(TINY), "workers": 0},
        "model": {"model": "deeplabv3", "backbone": "mobilenetv2"},
        "teacher": {"model": "deeplabv3", "backbone": "resnet18"},
        "train": {"budget": {"iterations": 2}, "batch_size": 2, "lr": 0.01, "log_every": 1, "val_every": 1000,
                  "save_every": 1000, "device": "cpu", "amp": "none", **train},
        "eval": {"max_images": 1},
    }
    if method:
        cfg["method"] = method
    if losses:
        cfg["losses"] = losses
    return cfg


@pytest.mark.parametrize("method", ["afdcd", "skd", "ifvd"])
def test_two_iterations_of_the_published_recipe(synth_root: Path, tmp_path: Path, method: str) -> None:
    result = Trainer(config_from_dict(tiny(synth_root, tmp_path / method, method)), progress=False).fit()
    assert result.iterations == 2
    recs = read_records(tmp_path / method / "log.jsonl", "train")
    assert [r["iteration"] for r in recs] == [1, 2]
    expected = {"afdcd": {"kd", "afdcd_fd", "afdcd_ctr"}, "skd": {"kd", "skd", "adv_g", "adv_d"},
                "ifvd": {"kd", "ifvd", "adv_g", "adv_d"}}[method]
    assert expected <= set(recs[0])
    ckpt = safe_load(tmp_path / method / "last.pt")
    if method != "afdcd":
        state = ckpt["auxiliary_optimizers"]["adv.discriminator"]
        assert state["state"] and all(int(s["step"]) == 2 for s in state["state"].values())
        assert any(k.startswith("adv.discriminator.") for k in ckpt["losses"])


def test_discriminator_is_not_in_the_students_optimiser(synth_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(config_from_dict(tiny(synth_root, tmp_path / "x", "skd")), progress=False)
    student_params = {id(p) for g in trainer.runner.optimizer.param_groups for p in g["params"]}
    disc = trainer.step_module.losses["adv"].discriminator
    assert not any(id(p) in student_params for p in disc.parameters())
    assert any(id(p) in student_params for p in trainer.student.parameters())
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    trainer.fit()
    assert any(not torch.equal(before[k], v) for k, v in disc.state_dict().items())


def _losses_by_iteration(run: Path) -> dict[int, dict[str, float]]:
    return {r["iteration"]: {k: v for k, v in r.items() if k not in ("kind", "iteration", "time", "train_seconds",
                                                                   "data_wait_seconds")}
            for r in read_records(run / "log.jsonl", "train")}


def test_kill_minus_nine_and_resume_keeps_both_optimisers(synth_root: Path, tmp_path: Path) -> None:
    # 6 iterations, a checkpoint every 2: killed at the first (iteration 2), the resumed run still saves and
    # goes on past a checkpoint of its own (4) before the end, as 8 did, with 4 fewer steps and 2 fewer saves.
    base = tiny(synth_root, tmp_path / "x", "skd", deterministic=True, save_every=2, budget={"iterations": 6})
    base["data"]["workers"] = 1
    Trainer(config_from_dict(dict(base, output_dir=str(tmp_path / "ref"))), progress=False).fit()
    expected = _losses_by_iteration(tmp_path / "ref")
    run = tmp_path / "killed"
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(base, output_dir=str(run))))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "cskd", "distill", str(cfg_path), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = safe_load(run / "last.pt")["iteration"]
    assert killed_at < 6, "the run finished before it could be killed; the test proves nothing"
    done = subprocess.run(cmd + ["--resume", "auto"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    got = _losses_by_iteration(run)
    assert sorted(got) == list(range(1, 7))
    assert got == expected  # bit-identical, the discriminator's loss included
    a, b = safe_load(tmp_path / "ref" / "last.pt"), safe_load(run / "last.pt")
    for k, v in a["losses"].items():
        assert torch.equal(v, b["losses"][k]), k


@register_loss("_test_adv_nan_at_3")
class _AdvNaNAtThree(AdversarialLoss):
    """The adversarial loss whose discriminator loss turns NaN at its third step."""

    def __init__(self, *, student_channels: int, teacher_channels: int, num_classes: int) -> None:
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels,
                         num_classes=num_classes)
        self.calls = 0

    def auxiliary_loss(self, student, teacher, targets=None):  # noqa: ANN001, ANN201
        self.calls += 1
        out = super().auxiliary_loss(student, teacher, targets)
        return {"adv_d": out["adv_d"] * (float("nan") if self.calls == 3 else 1.0)}


def test_diverging_discriminator_stops_naming_the_term_and_keeps_the_checkpoint(
    synth_root: Path, tmp_path: Path
) -> None:
    cfg = tiny(synth_root, tmp_path / "nan", losses=[{"name": "_test_adv_nan_at_3"}], budget={"iterations": 6},
               save_every=2, log_every=5)
    with pytest.raises(TrainingError) as e:
        Trainer(config_from_dict(cfg), progress=False).fit()
    msg = str(e.value)
    assert "iteration 3" in msg and "non-finite: adv_d" in msg and "last.pt" in msg
    assert safe_load(tmp_path / "nan" / "last.pt")["iteration"] == 2


def test_ddp_gloo_keeps_one_discriminator(synth_root: Path, tmp_path: Path) -> None:
    """Two processes see different images; their discriminators stay identical only if its gradients are averaged
    (it is kept out of DDP's own reduction)."""
    import torch.multiprocessing as mp

    from test_engine import _ddp_worker, _free_port, tiny_config

    losses = [dict(lc) for lc in METHODS["skd"].losses]
    cfg = tiny_config(synth_root, tmp_path / "ddp", losses, batch_size=4, budget={"iterations": 2})
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    disc = [k for k in a if k.startswith("losses.adv.discriminator.")]
    assert disc
    for k in a:
        # The BatchNorm statistics (the student's and D's input BN) are per process on CPUs (no SyncBatchNorm);
        # D never uses its running statistics (it is always in training mode).
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(a[k], b[k]), k
    init = Trainer(config_from_dict(dict(cfg, output_dir=str(tmp_path / "init"))), progress=False)
    init_disc = init.step_module.losses.state_dict()
    assert any(not torch.equal(init_disc[k[len("losses."):]], a[k]) for k in disc if a[k].is_floating_point())
