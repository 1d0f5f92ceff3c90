"""Methods v2 (DIST, DSD, CIRKDV2, feature KD): each formula against a float64 reference written here from the
maths (explicit loops / numpy), agreement with the authors' published code on fixed inputs (numbers in
tests/data/reference_losses_v2.pt, produced by running their code from a scratch copy outside the repo), maps of
different size and width, bad hyper-parameters, the channel memory, and 2-iteration engine runs per method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cskd.errors import ConfigError
from cskd.losses import LOSSES, _load_all, build_loss
from cskd.losses.methods import METHODS
from cskd.models.segmentor import SegOutput

DATA = Path(__file__).parent / "data" / "reference_losses_v2.pt"
K = 5


def build(name, cs=6, ct=8, k=K, **params):
    return build_loss(name, params, student_channels=cs, teacher_channels=ct, num_classes=k).double()


def outputs(b=2, c=6, h=9, w=11, k=K, seed=0, aux=True, grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b, k, h, w, generator=g, dtype=torch.float64)
    aux_logits = 2 * torch.randn(b, k, h, w, generator=g, dtype=torch.float64) if aux else None
    feats = torch.randn(b, c, h, w, generator=g, dtype=torch.float64).relu() + 0.05
    if grad:
        logits.requires_grad_(True)
        feats.requires_grad_(True)
        if aux_logits is not None:
            aux_logits.requires_grad_(True)
    return SegOutput(logits, aux_logits, feats)


def np_(t):
    return t.detach().numpy().astype(np.float64)


def np_softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_unit(v):
    return v / max(np.linalg.norm(v), 1e-12)


# ------------------------------------------------------------------------------------------------ registry


def test_registered_with_published_defaults_and_methods():
    _load_all()
    for name in ("dist", "dsd", "cirkdv2", "featkd"):
        assert name in LOSSES
    assert LOSSES["dist"].needs_teacher_aux and LOSSES["dsd"].needs_teacher_aux
    assert LOSSES["cirkdv2"].needs_targets and not LOSSES["featkd"].needs_targets
    d = build("dist")
    assert (d.weight, d.beta, d.gamma, d.temperature, d.aux_weight) == (1.0, 1.0, 1.0, 1.0, 0.4)
    s = build("dsd")
    assert (s.lambda_pixel, s.lambda_category, s.temperature, s.pool) == (1000.0, 10.0, 4.0, 2)
    c = build("cirkdv2", pixel_memory_size=40, region_memory_size=8, channel_memory_size=30)
    assert c.fitnet.weight == 1.0 and c.gcn is not None
    assert (c.cirkd.minibatch_pixel_weight, c.cirkd.memory_pixel_weight, c.cirkd.memory_region_weight) == \
        (1.0, 0.1, 0.1)
    ch = c.channel
    assert (ch.minibatch_weight, ch.memory_weight, ch.kd_weight) == (1.0, 0.1, 100.0)
    assert (ch.contrast_size, ch.enqueued, ch.pool, ch.contrast_temperature, ch.enqueue) == \
        (2048, 256, 4, 0.1, "after")
    assert build("featkd").weight == 1.0
    assert [lc["name"] for lc in METHODS["dist"].losses] == ["dist"]
    assert [lc["name"] for lc in METHODS["dsd"].losses] == ["dsd"]
    assert [lc["name"] for lc in METHODS["cirkdv2"].losses] == ["kd", "cirkdv2"]
    assert METHODS["cirkdv2_fitnet10"].losses[1]["fitnet_weight"] == 10.0
    assert [lc["name"] for lc in METHODS["featkd"].losses] == ["featkd"]


@pytest.mark.parametrize("name, params, key", [
    ("dist", {"beta": -1.0}, "beta"),
    ("dist", {"aux_weight": -0.4}, "aux_weight"),
    ("dist", {"temperature": 0.0}, "temperature"),
    ("dist", {"beta": 0.0, "gamma": 0.0}, "gamma"),
    ("dsd", {"lambda_pixel": -1.0}, "lambda_pixel"),
    ("dsd", {"lambda_category": -10.0}, "lambda_category"),
    ("dsd", {"missing_aux": "guess"}, "missing_aux"),
    ("cirkdv2", {"channel_kd_weight": -100.0}, "channel_kd_weight"),
    ("cirkdv2", {"memory_channel_weight": -0.1}, "memory_channel_weight"),
    ("cirkdv2", {"fitnet_weight": -1.0}, "fitnet_weight"),
    ("cirkdv2", {"channel_pool": 0}, "channel_pool"),
    ("cirkdv2", {"channel_memory_size": 0}, "channel_memory_size"),
    ("cirkdv2", {"channel_enqueue": "never"}, "channel_enqueue"),
    ("cirkdv2", {"memory_pixel_weight": -1.0}, "memory_pixel_weight"),
    ("featkd", {"weight": -1.0}, "weight"),
])
def test_bad_hyper_parameters_name_the_key(name, params, key):
    with pytest.raises(ConfigError, match=f"{name}.*{key}"):
        build_loss(name, params, student_channels=6, teacher_channels=8, num_classes=K)


# ------------------------------------------------------------------------------------------------ DIST


def _np_pearson(u, v, eps=1e-8):
    u, v = u - u.mean(), v - v.mean()
    return float((u * v).sum() / (np.linalg.norm(u) * np.linalg.norm(v) + eps))


def _np_dist(zs, zt, beta=1.0, gamma=1.0, tau=1.0):
    """Loops over pixels (inter) and classes (intra) of B×K×h×w arrays."""
    ps, pt = np_softmax(zs / tau, 1), np_softmax(zt / tau, 1)
    b, k, h, w = ps.shape
    rows_s = [ps[i, :, y, x] for i in range(b) for y in range(h) for x in range(w)]
    rows_t = [pt[i, :, y, x] for i in range(b) for y in range(h) for x in range(w)]
    inter = 1 - np.mean([_np_pearson(a, c) for a, c in zip(rows_s, rows_t)])
    intra = 1 - np.mean([_np_pearson(ps[:, c].ravel(), pt[:, c].ravel()) for c in range(k)])
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("tau, beta, gamma", [(1.0, 1.0, 1.0), (2.0, 0.5, 2.0)])
def test_dist_matches_reference_and_flows_to_student(tau, beta, gamma):
    s, t = outputs(grad=True, seed=1), outputs(seed=2, c=8)
    loss = build("dist", temperature=tau, beta=beta, gamma=gamma, weight=3.0)
    out = loss(s, t)
    assert set(out) == {"dist", "dist_aux"}
    ref = _np_dist(np_(s.logits), np_(t.logits), beta, gamma, tau)
    ref_aux = _np_dist(np_(s.aux_logits), np_(t.aux_logits), beta, gamma, tau)
    np.testing.assert_allclose(out["dist"].item(), 3.0 * ref, rtol=1e-10)
    np.testing.assert_allclose(out["dist_aux"].item(), 0.4 * 3.0 * ref_aux, rtol=1e-10)
    sum(out.values()).backward()
    assert s.logits.grad.abs().sum() > 0 and s.aux_logits.grad.abs().sum() > 0


def test_dist_without_aux_heads_has_no_aux_term():
    out = build("dist")(outputs(aux=False), outputs(seed=3))
    assert set(out) == {"dist"}
    assert set(build("dist", aux_weight=0.0)(outputs(), outputs(seed=3))) == {"dist"}


# ------------------------------------------------------------------------------------------------ DSD


def _np_psd(s_maps, t_maps):
    def att(f):  # B×C×h×w → B rows of normalised mean_c f²
        a = (f**2).mean(axis=1).reshape(f.shape[0], -1)
        return np.stack([np_unit(r) for r in a])

    a_s, a_t = [att(f) for f in s_maps], [att(f) for f in t_maps]
    errs = []
    for n in range(len(a_s)):
        for m in range(n + 1, len(a_s)):
            r_s = np.stack([np_unit(np_unit(r)) for r in a_s[m] - a_s[n]])
            r_t = np.stack([np_unit(np_unit(r)) for r in a_t[m] - a_t[n]])
            errs.append(((r_s - r_t) ** 2).mean())
    return float(np.mean(errs))


def _np_csd(zs, zt, tau=4.0):
    def gram(z):
        b, k, h, w = z.shape
        ph, pw = -(-h // 2), -(-w // 2)
        pooled = np.zeros((b, k, ph, pw))
        for y in range(ph):
            for x in range(pw):
                pooled[:, :, y, x] = z[:, :, 2 * y: 2 * y + 2, 2 * x: 2 * x + 2].mean(axis=(2, 3))
        q = np_softmax(pooled.reshape(b, k, -1) / tau, 2)
        return np.einsum("bkn,bln->bkl", q, q)

    return float(((gram(zs) - gram(zt)) ** 2).mean())


def test_dsd_matches_reference_with_and_without_student_aux_head():
    s, t = outputs(grad=True, seed=4), outputs(seed=5, c=8)
    out = build("dsd")(s, t)
    ref_psd = _np_psd([np_(s.aux_logits), np_(s.features), np_(s.logits)],
                      [np_(t.aux_logits), np_(t.features), np_(t.logits)])
    np.testing.assert_allclose(out["dsd_pixel"].item(), 1000.0 * ref_psd, rtol=1e-10)
    np.testing.assert_allclose(out["dsd_category"].item(), 10.0 * _np_csd(np_(s.logits), np_(t.logits)), rtol=1e-10)
    sum(out.values()).backward()
    assert s.features.grad.abs().sum() > 0 and s.aux_logits.grad.abs().sum() > 0
    # No student aux head: "drop" compares [features, logits] of both; "published" puts the student's logits first.
    s2 = SegOutput(s.logits.detach(), None, s.features.detach())
    dropped = build("dsd")(s2, t)["dsd_pixel"].item()
    np.testing.assert_allclose(dropped, 1000.0 * _np_psd([np_(s.features), np_(s.logits)],
                                                         [np_(t.features), np_(t.logits)]), rtol=1e-10)
    published = build("dsd", missing_aux="published")(s2, t)["dsd_pixel"].item()
    np.testing.assert_allclose(published, 1000.0 * _np_psd([np_(s.logits), np_(s.features), np_(s.logits)],
                                                           [np_(t.aux_logits), np_(t.features), np_(t.logits)]),
                               rtol=1e-10)


# ------------------------------------------------------------------------------------------------ feature KD


def test_featkd_matches_reference_resizes_the_student_and_trains_its_connector():
    s, t = outputs(grad=True, seed=6, h=6, w=7), outputs(seed=7, c=8, h=12, w=14)
    loss = build("featkd", weight=2.0)
    out = loss(s, t)["featkd"]
    up = F.interpolate(s.features.detach(), size=(12, 14), mode="bilinear", align_corners=False)
    w = loss.connector.weight.detach()[:, :, 0, 0].numpy()
    hint = np.einsum("oc,bchw->bohw", w, up.numpy())
    np.testing.assert_allclose(out.item(), 2.0 * ((hint - np_(t.features)) ** 2).mean(), rtol=1e-10)
    out.backward()
    assert loss.connector.weight.grad.abs().sum() > 0 and s.features.grad.abs().sum() > 0
    fitnet = build("fitnet", weight=2.0)  # fitnet resizes the same way (the package's rule, losses/_spatial.py)
    fitnet.connector.load_state_dict(loss.connector.state_dict())
    assert torch.equal(fitnet(s, t)["fitnet"], out.detach())


# ------------------------------------------------------------------------------------------------ CIRKDV2


def _channel_only(**over):
    params = dict(fitnet_weight=0.0, minibatch_pixel_weight=0.0, memory_pixel_weight=0.0, memory_region_weight=0.0,
                  minibatch_channel_weight=1.0, memory_channel_weight=1.0, channel_kd_weight=1.0,
                  channel_memory_size=40, channel_contrast_size=40)
    params.update(over)
    return build("cirkdv2", **params).train()


def _np_kl_rows(zt, zs):
    pt, ps = np_softmax(zt, -1), np_softmax(zs, -1)
    return (pt * (np.log(pt) - np.log(ps))).sum(-1)


def _np_channel_terms(s, t, queue, tau=0.1, big_t=1.0):
    """s, t: B×C×d normalised channel vectors; queue: M×d (all entries are the contrast set)."""
    b, c, _ = s.shape
    mb = sum(_np_kl_rows(t[i] @ t[j].T / tau, s[i] @ s[j].T / tau).sum() / c for i in range(b) for j in range(b))
    mb /= b * b
    mse = ((s - t) ** 2).mean()
    fs, ft = s.reshape(b * c, -1), t.reshape(b * c, -1)
    mem = big_t**2 * _np_kl_rows(ft @ queue.T / (tau * big_t), fs @ queue.T / (tau * big_t)).sum() / (b * c)
    return mb, mem, mse


def _np_unit_rows(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@pytest.mark.parametrize("enqueue", ["after", "before"])
def test_cirkdv2_channel_terms_match_reference_and_enqueue_teacher_channels(enqueue):
    s, t = outputs(grad=True, seed=8, h=12, w=16), outputs(seed=9, c=8, h=12, w=16)
    loss = _channel_only(channel_enqueue=enqueue)
    loss.channel._ensure_queue(12)  # d = 3·4 pooled positions (otherwise done by the first batch)
    q0 = np_(loss.channel.channel_queue).copy()
    pooled_s = F.avg_pool2d(s.features.detach(), 4, 4, ceil_mode=True)
    with torch.no_grad():  # training-mode BN: the projection of this batch, as inside the loss
        proj = loss.channel.project(pooled_s)
    out = loss(s, t)
    s_np = _np_unit_rows(np_(proj).reshape(2, 8, -1))
    t_np = _np_unit_rows(np_(F.avg_pool2d(t.features, 4, 4, ceil_mode=True)).reshape(2, 8, -1))
    # 16 teacher channels (B·C ≤ 256) entered slots 0…15, in random order; the rest is untouched.
    q1 = np_(loss.channel.channel_queue)
    np.testing.assert_allclose(np.sort(q1[:16], axis=0), np.sort(t_np.reshape(16, -1), axis=0), rtol=1e-12)
    np.testing.assert_array_equal(q1[16:], q0[16:])
    assert int(loss.channel.channel_queue_ptr) == 16
    # The contrast set is the whole memory: after (default) = as it was before this batch; before = published.
    mb, mem, mse = _np_channel_terms(s_np, t_np, q0 if enqueue == "after" else q1)
    np.testing.assert_allclose(out["cirkdv2_minibatch_channel"].item(), mb, rtol=1e-10)
    np.testing.assert_allclose(out["cirkdv2_memory_channel"].item(), mem, rtol=1e-10)
    np.testing.assert_allclose(out["cirkdv2_channel_kd"].item(), mse, rtol=1e-10)
    sum(out.values()).backward()
    assert s.features.grad.abs().sum() > 0


def test_cirkdv2_channel_memory_is_a_ring_buffer_and_survives_a_state_dict_round_trip():
    s, t = outputs(seed=10, h=8, w=8), outputs(seed=11, c=8, h=8, w=8)
    loss = _channel_only(channel_memory_size=20, channel_contrast_size=20)
    loss(s, t)
    loss(s, t)  # 16 + 16 entries into 20 slots: wraps around
    assert int(loss.channel.channel_queue_ptr) == 12
    state = loss.state_dict()
    fresh = _channel_only(channel_memory_size=20, channel_contrast_size=20)
    assert fresh.channel.channel_queue.shape == (20, 0)  # sized by the first batch (or a checkpoint)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.channel.channel_queue, loss.channel.channel_queue)
    with pytest.raises(ValueError, match="channel memory"):
        fresh(outputs(seed=10, h=16, w=16), outputs(seed=11, c=8, h=16, w=16))
    loss.eval()
    before = loss.channel.channel_queue.clone()
    loss(s, t)
    assert torch.equal(before, loss.channel.channel_queue)  # evaluation leaves the memory alone


def test_cirkdv2_full_recipe_terms_resized_student_and_gradients():
    s, t = outputs(grad=True, seed=12, h=6, w=8), outputs(seed=13, c=8, h=12, w=16)
    small = torch.randint(0, K, (2, 12, 16), generator=torch.Generator().manual_seed(0))
    targets = small.repeat_interleave(8, 1).repeat_interleave(8, 2)
    loss = build("cirkdv2", pixel_memory_size=40, region_memory_size=8, channel_memory_size=30).train()
    out = loss(s, t, targets)
    assert set(out) == {"cirkdv2_fitnet", "cirkdv2_minibatch_pixel", "cirkdv2_memory_pixel", "cirkdv2_memory_region",
                        "cirkdv2_minibatch_channel", "cirkdv2_memory_channel", "cirkdv2_channel_kd"}
    sum(out.values()).backward()
    assert s.features.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss.gcn.parameters())
    assert all(p.grad is not None for p in loss.channel.project.parameters())


# ------------------------------------------------------------------------------------------------ authors' code


@pytest.fixture(scope="module")
def published():
    return torch.load(DATA, weights_only=True)


def test_agrees_with_published_dist(published):
    x, ref = published["inputs"], published["outputs"]
    s = SegOutput(x["s_logits"], x["s_aux"], x["s_feat"])
    t = SegOutput(x["t_logits"], x["t_aux"], x["t_feat"])
    out = build("dist")(s, t)
    torch.testing.assert_close(out["dist"], ref["dist"], rtol=1e-12, atol=0)
    torch.testing.assert_close(out["dist_aux"], 0.4 * ref["dist_aux"], rtol=1e-12, atol=0)


def test_agrees_with_published_dsd(published):
    x, ref = published["inputs"], published["outputs"]
    s = SegOutput(x["s_logits"], x["s_aux"], x["s_feat"])
    t = SegOutput(x["t_logits"], x["t_aux"], x["t_feat"])
    out = build("dsd", lambda_pixel=1.0, lambda_category=1.0)(s, t)
    # The published PSD accumulates in a float32 scalar.
    torch.testing.assert_close(out["dsd_pixel"], ref["dsd_pixel"], rtol=1e-6, atol=0)
    torch.testing.assert_close(out["dsd_category"], ref["dsd_category"], rtol=1e-10, atol=0)
    no_aux = SegOutput(x["s_logits"], None, x["s_feat"])
    out = build("dsd", lambda_pixel=1.0, missing_aux="published")(no_aux, t)
    torch.testing.assert_close(out["dsd_pixel"], ref["dsd_pixel_noaux_published"], rtol=1e-6, atol=0)


def test_agrees_with_published_cirkdv2(published):
    x, ref = published["inputs"], published["outputs"]
    s = SegOutput(x["s_logits"], x["s_aux"], x["s_feat"])
    t = SegOutput(x["t_logits"], x["t_aux"], x["t_feat"])
    # GCN + FitNet + mini-batch pixel relations, weights shared with the published modules.
    loss = build("cirkdv2", memory_pixel_weight=0.0, memory_region_weight=0.0, minibatch_channel_weight=0.0,
                 memory_channel_weight=0.0, channel_kd_weight=0.0).train()
    loss.gcn.load_state_dict(published["gcn"])
    loss.fitnet.connector.weight.data.copy_(published["fitnet_connector"])
    out = loss(s, t)
    torch.testing.assert_close(out["cirkdv2_fitnet"], ref["cirkdv2_fitnet"], rtol=1e-10, atol=0)
    torch.testing.assert_close(out["cirkdv2_minibatch_pixel"], ref["cirkdv2_minibatch_pixel"], rtol=1e-6, atol=0)
    # Channel relations, published order (enqueue before the contrast), the whole memory as contrast set.
    loss = _channel_only(channel_enqueue="before", channel_memory_size=40, channel_contrast_size=40)
    loss.channel.project.load_state_dict(published["channel_project"])
    loss.channel.channel_queue = published["channel_queue"].clone()
    cs = SegOutput(s.logits, None, x["c_s_feat"])
    ct = SegOutput(t.logits, None, x["c_t_feat"])
    out = loss(cs, ct)
    for term in ("cirkdv2_minibatch_channel", "cirkdv2_memory_channel", "cirkdv2_channel_kd"):
        torch.testing.assert_close(out[term], ref[term], rtol=1e-6, atol=0, msg=term)


# ------------------------------------------------------------------------------------------------ sizes, widths


@pytest.mark.parametrize("name, params", [
    ("dist", {}), ("dsd", {}), ("featkd", {}),
    ("cirkdv2", {"pixel_memory_size": 40, "region_memory_size": 8, "channel_memory_size": 30}),
])
def test_student_maps_of_other_size_and_width_are_resized_to_the_teacher(name, params):
    s, t = outputs(seed=14, c=6, h=6, w=8), outputs(seed=15, c=8, h=12, w=16)
    up = SegOutput(*(F.interpolate(v, size=(12, 16), mode="bilinear", align_corners=False) for v in s[:3]))
    small = torch.randint(0, K, (2, 12, 16), generator=torch.Generator().manual_seed(1))
    targets = small.repeat_interleave(8, 1).repeat_interleave(8, 2)
    loss = build(name, **params).eval()  # eval: no memory update, so both calls see the same state
    torch.manual_seed(0)
    a = loss(s, t, targets)
    torch.manual_seed(0)
    b = loss(up, t, targets)
    assert set(a) == set(b)
    if name == "dsd":  # DSD resizes the student's attention map, not the map itself: close, not equal
        torch.testing.assert_close(a["dsd_category"], b["dsd_category"])
        assert torch.isfinite(a["dsd_pixel"])
    else:
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=k)


# ------------------------------------------------------------------------------------------------ engine


@pytest.mark.parametrize("method", ["dist", "dsd", "cirkdv2", "featkd"])
def test_method_runs_two_iterations_with_a_resnet18_student(synth_root, tmp_path, method):
    from cskd.engine.config import config_from_dict
    from cskd.engine.records import read_records
    from cskd.engine.trainer import Trainer

    cfg = {
        "name": method, "output_dir": str(tmp_path / method), "method": method,
        "data": {"dataset": "synthscapes", "root": str(synth_root), "crop_size": [32, 64], "workers": 0},
        "model": {"model": "deeplabv3", "backbone": "resnet18"},
        "teacher": {"model": "deeplabv3", "backbone": "resnet18"},
        "train": {"budget": {"iterations": 2}, "batch_size": 2, "lr": 0.01, "log_every": 1, "val_every": 1000,
                  "save_every": 1000, "device": "cpu", "amp": "none"},
        "eval": {"max_images": 1},
    }
    if method == "cirkdv2":
        cfg["losses"] = [dict(lc) for lc in METHODS[method].losses]
        del cfg["method"]
        cfg["losses"][1].update(pixel_memory_size=64, region_memory_size=8, channel_memory_size=32)
    result = Trainer(config_from_dict(cfg), progress=False).fit()
    assert result.iterations == 2
    recs = read_records(tmp_path / method / "log.jsonl", "train")
    terms = {k for r in recs for k in r}
    expected = {"dist": {"dist", "dist_aux"}, "dsd": {"dsd_pixel", "dsd_category"},
                "cirkdv2": {"kd", "cirkdv2_fitnet", "cirkdv2_memory_channel"}, "featkd": {"featkd"}}[method]
    assert expected <= terms, terms
    assert all(v == v for r in recs for k, v in r.items() if isinstance(v, float))


def test_teacher_aux_head_is_kept_from_the_teacher_file(tmp_path):
    from cskd.checkpoints.weights import load_teacher_weights
    from cskd.models import build_segmentor

    src = build_segmentor("deeplabv3", "resnet18", K, aux=True)
    path = tmp_path / "teacher.pth"
    torch.save(src.state_dict(), path)
    teacher = build_segmentor("deeplabv3", "resnet18", K, aux=True)
    load_teacher_weights(teacher, str(path), keep_aux=True)
    for (name, a), b in zip(src.aux_head.state_dict().items(), teacher.aux_head.state_dict().values()):
        assert torch.equal(a, b), name
    plain = build_segmentor("deeplabv3", "resnet18", K, aux=False)
    load_teacher_weights(plain, str(path))  # the default drops the aux head, as before


# ------------------------------------------------------------------------------------------------ DDP


def _ddp_channel_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # differently seeded ranks: the published queues would drift apart
        loss = _channel_only(channel_memory_size=40, channel_contrast_size=40)
        s, t = outputs(seed=20 + rank, h=8, w=8), outputs(seed=30 + rank, c=8, h=8, w=8)
        loss(s, t)
        torch.save({k: v for k, v in loss.state_dict().items() if "queue" in k}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_cirkdv2_channel_memory_is_identical_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_channel_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert int(r0["channel.channel_queue_ptr"]) == 32  # 16 channels from each rank (⌊256/2⌋ ≥ 16)
    # Rank-major: slots 0…15 hold rank 0's teacher channels, 16…31 rank 1's.
    for rank, slots in ((0, slice(0, 16)), (1, slice(16, 32))):
        t = outputs(seed=30 + rank, c=8, h=8, w=8).features
        ref = _np_unit_rows(np_(F.avg_pool2d(t, 4, 4, ceil_mode=True)).reshape(16, -1))
        got = np_(r0["channel.channel_queue"][slots])
        np.testing.assert_allclose(np.sort(got, axis=0), np.sort(ref, axis=0), rtol=1e-12)
