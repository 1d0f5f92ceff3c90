"""The peer methods (CIRKD, SKD, IFVD, AT, FitNet): each formula against a float64 reference written here from
the maths, gradient flow, ignore pixels, and CIRKD's memory (FIFO ring buffers, class-wise sampling, DDP gather)."""

from __future__ import annotations

import math

import pytest
import torch

from cskd.errors import ConfigError
from cskd.losses import LOSSES, _load_all, build_loss
from cskd.losses.cirkd import (
    fifo_enqueue,
    minibatch_pixel_relation,
    relation_kd,
    sample_class_pixels,
)
from cskd.losses.ifvd import downsample_labels
from cskd.models.segmentor import SegOutput

IGNORE = 255
STRIDE = 8


def seg(features: torch.Tensor, num_classes: int = 3) -> SegOutput:
    b, _, h, w = features.shape
    return SegOutput(torch.zeros(b, num_classes, h, w, dtype=features.dtype), None, features)


def make_batch(b=2, cs=4, ct=6, h=5, w=7, k=3, seed=0, ignore_rows=1):
    """Student/teacher features (float64, teacher post-ReLU like the heads) and input-resolution labels with an
    ignored band; labels are constant on each STRIDE×STRIDE cell so the downsampled labels are known exactly."""
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(b, cs, h, w, generator=g, dtype=torch.float64)
    ft = torch.randn(b, ct, h, w, generator=g, dtype=torch.float64).relu() + 0.05
    small = torch.randint(0, k, (b, h, w), generator=g)
    small[:, :ignore_rows] = IGNORE
    targets = small.repeat_interleave(STRIDE, 1).repeat_interleave(STRIDE, 2)
    return fs, ft, small, targets


def build(name, cs=4, ct=6, k=3, **params):
    return build_loss(name, params, student_channels=cs, teacher_channels=ct, num_classes=k).double()


def unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x/‖x‖, with the usual guard ‖x‖ ≥ 1e-12 (a zero vector stays zero)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def kl_rows(zt: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """KL(softmax(zt) ‖ softmax(zs)) per row, from the definition."""
    pt = zt.exp() / zt.exp().sum(-1, keepdim=True)
    ps = zs.exp() / zs.exp().sum(-1, keepdim=True)
    return (pt * (pt.log() - ps.log())).sum(-1)


# ------------------------------------------------------------------------------------------------ registry


def test_registered_with_published_defaults():
    _load_all()
    for name in ("cirkd", "skd", "ifvd", "at", "fitnet"):
        assert name in LOSSES
    assert LOSSES["cirkd"].needs_targets and LOSSES["ifvd"].needs_targets
    assert not (LOSSES["skd"].needs_targets or LOSSES["at"].needs_targets or LOSSES["fitnet"].needs_targets)
    small = dict(pixel_memory_size=40, region_memory_size=8)
    c = build_loss("cirkd", small, student_channels=4, teacher_channels=6, num_classes=19)
    assert (c.minibatch_pixel_weight, c.memory_pixel_weight, c.memory_region_weight) == (1.0, 0.1, 0.1)
    assert (c.contrast_temperature, c.contrast_kd_temperature, c.pixels_per_class) == (0.1, 1.0, 16)
    assert (c.pixel_contrast_per_class, c.region_contrast_per_class) == (4096 // 19 + 1, 1024 // 19 + 1)
    assert c.pixel_queue.shape == (19, 40, 6) and c.region_queue.shape == (19, 8, 6)
    weights = {n: build_loss(n, {}, student_channels=4, teacher_channels=6, num_classes=3).weight
               for n in ("skd", "ifvd", "at", "fitnet")}
    assert weights == {"skd": 10.0, "ifvd": 20.0, "at": 10000.0, "fitnet": 10.0}


@pytest.mark.parametrize("name, params", [
    ("cirkd", {"contrast_temperature": 0}),
    ("cirkd", {"minibatch_pixel_weight": 0, "memory_pixel_weight": 0, "memory_region_weight": 0}),
    ("cirkd", {"pixel_memory_size": 0}),
    ("skd", {"pool": 0}),
    ("at", {"p": -1.0}),
    ("fitnet", {"weight": -1.0}),
    ("ifvd", {"weigth": 1.0}),
])
def test_bad_hyper_parameters_name_the_key(name, params):
    with pytest.raises(ConfigError, match=name):
        build_loss(name, params, student_channels=4, teacher_channels=6, num_classes=3)


def test_downsample_labels_is_nearest():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 256, (2, 45, 61), generator=g)
    out = downsample_labels(t, (6, 8))
    rows = [math.floor(i * 45 / 6) for i in range(6)]
    cols = [math.floor(j * 61 / 8) for j in range(8)]
    assert torch.equal(out, t[:, rows][:, :, cols])
    assert torch.equal(downsample_labels(t, (45, 61)), t)


# ------------------------------------------------------------------------------------------------ AT, FitNet, SKD


def test_at_matches_reference_and_flows_to_student():
    fs, ft, _, _ = make_batch()
    fs.requires_grad_(True)
    ft.requires_grad_(True)  # must get no gradient: the teacher is a constant
    loss = build("at")
    out = loss(seg(fs), seg(ft))["at"]

    def att(f):
        a = (f**2).sum(1) / f.shape[1]
        a = a.reshape(f.shape[0], -1)
        return a / a.norm(dim=1, keepdim=True)

    ref = 10000.0 * ((att(fs.detach()) - att(ft.detach())) ** 2).sum() / (fs.shape[0] * fs.shape[2] * fs.shape[3])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0 and ft.grad is None


def test_fitnet_matches_reference_and_trains_its_connector():
    fs, ft, _, _ = make_batch()
    fs.requires_grad_(True)
    ft.requires_grad_(True)
    loss = build("fitnet")
    out = loss(seg(fs), seg(ft))["fitnet"]
    w = loss.connector.weight.detach()[:, :, 0, 0]
    hint = torch.einsum("oc,bchw->bohw", w, fs.detach())
    ref = 10.0 * ((hint - ft.detach()) ** 2).sum() / ft.numel()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.backward()
    assert loss.connector.weight.grad is not None and loss.connector.weight.grad.abs().sum() > 0
    assert fs.grad.abs().sum() > 0 and ft.grad is None


def _ref_pool(f, k, op):
    """k×k cells, ceil mode: the last row/column of cells is clipped to the map."""
    b, c, h, w = f.shape
    ho, wo = -(-h // k), -(-w // k)
    out = torch.empty(b, c, ho, wo, dtype=f.dtype)
    for i in range(ho):
        for j in range(wo):
            cell = f[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(b, c, -1)
            out[:, :, i, j] = cell.amax(-1) if op == "max" else cell.mean(-1)
    return out


@pytest.mark.parametrize("pool", [1, 2])
def test_skd_matches_reference(pool):
    fs, ft, _, _ = make_batch(h=5, w=7)
    fs.requires_grad_(True)
    loss = build("skd", pool=pool)
    out = loss(seg(fs), seg(ft))["skd"]

    def sims(f):
        f = _ref_pool(f, pool, "max") if pool > 1 else f
        v = unit(f.reshape(f.shape[0], f.shape[1], -1), 1)
        return torch.einsum("bcp,bcq->bpq", v, v)

    ss, st = sims(fs.detach()), sims(ft)
    ref = 10.0 * ((ss - st) ** 2).sum() / ss.numel()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.backward()
    assert fs.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ IFVD


def test_ifvd_matches_reference_with_ignored_pixels():
    k = 3
    fs, ft, small, targets = make_batch(k=k)
    fs.requires_grad_(True)
    ft.requires_grad_(True)
    loss = build("ifvd", k=k)
    out = loss(seg(fs), seg(ft), targets)["ifvd"]

    def ref(f_s, f_t):
        b, _, h, w = f_s.shape
        total = torch.zeros((), dtype=torch.float64)
        for i in range(b):
            for cls in range(k):
                mask = small[i] == cls
                if not mask.any():
                    continue
                cen_s = f_s[i][:, mask].mean(1)
                cen_t = f_t[i][:, mask].mean(1)
                for y, x in mask.nonzero().tolist():
                    vs = f_s[i, :, y, x] @ cen_s / (f_s[i, :, y, x].norm() * cen_s.norm())
                    vt = f_t[i, :, y, x] @ cen_t / (f_t[i, :, y, x].norm() * cen_t.norm())
                    total = total + (vs - vt) ** 2
        return 20.0 * total / (b * h * w)  # ignored pixels count in the mean with 0, as published

    fs_ref = fs.detach().clone().requires_grad_(True)
    r = ref(fs_ref, ft.detach())
    torch.testing.assert_close(out, r, rtol=1e-10, atol=1e-12)
    out.backward()
    r.backward()
    torch.testing.assert_close(fs.grad, fs_ref.grad, rtol=1e-8, atol=1e-12)  # through pixels *and* centres
    assert ft.grad is None
    # Ignored pixels carry no gradient.
    assert fs.grad[:, :, 0].abs().sum() == 0


def test_ifvd_needs_targets():
    fs, ft, _, _ = make_batch()
    with pytest.raises(ValueError, match="targets"):
        build("ifvd")(seg(fs), seg(ft))


# ------------------------------------------------------------------------------------------------ CIRKD: mini-batch


def _ref_minibatch(fs, ft, tau, pool=1):
    if pool > 1:
        fs, ft = _ref_pool(fs, pool, "avg"), _ref_pool(ft, pool, "avg")
    b = fs.shape[0]
    s = unit(fs.reshape(b, fs.shape[1], -1), 1)
    t = unit(ft.reshape(b, ft.shape[1], -1), 1)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            rows = kl_rows(t[i].T @ t[j] / tau, s[i].T @ s[j] / tau)
            total = total + rows.sum() / rows.numel()  # "batchmean" over the n rows of one pair
    return total / b**2


@pytest.mark.parametrize("pool, block", [(1, 1 << 26), (1, 40), (2, 1 << 26)])
def test_cirkd_minibatch_matches_reference_value_and_gradient(pool, block):
    fs, ft, _, _ = make_batch(b=3, h=5, w=7)
    fs.requires_grad_(True)
    out = minibatch_pixel_relation(fs, ft, 0.5, pool=pool, block_elements=block)
    fs_ref = fs.detach().clone().requires_grad_(True)
    ref = _ref_minibatch(fs_ref, ft, 0.5, pool)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    out.backward()
    ref.backward()
    torch.testing.assert_close(fs.grad, fs_ref.grad, rtol=1e-8, atol=1e-12)


def test_relation_kd_gradients_match_autograd_for_rows_and_columns():
    g = torch.Generator().manual_seed(3)
    sr, sc = (torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    tr, tc = torch.randn(2, 5, 6, generator=g, dtype=torch.float64), torch.randn(2, 5, 6, generator=g,
                                                                               dtype=torch.float64)
    w = torch.rand(2, 5, generator=g, dtype=torch.float64)
    out = relation_kd(sr, sc, tr, tc, w, 0.7, 2.0, block_elements=7)
    sr2, sc2 = sr.detach().clone().requires_grad_(True), sc.detach().clone().requires_grad_(True)
    zs = sr2 @ sc2.mT / (0.7 * 2.0)
    zt = tr @ tc.mT / (0.7 * 2.0)
    ref = 4.0 * (w * kl_rows(zt, zs)).sum()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (3.0 * out).backward()
    (3.0 * ref).backward()
    torch.testing.assert_close(sr.grad, sr2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sc.grad, sc2.grad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ CIRKD: memory


def _ref_projection(loss, fs):
    """conv1×1 → BatchNorm (training: batch statistics, biased variance) → ReLU → conv1×1, written out."""
    conv1, bn, _, conv2 = loss.project
    y = torch.einsum("oc,bchw->bohw", conv1.weight[:, :, 0, 0], fs)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    y = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    return torch.einsum("oc,bchw->bohw", conv2.weight[:, :, 0, 0], y.clamp_min(0))


def _ref_memory(loss, fs, ft, small, pixel_queue, region_queue, tau, big_t, k):
    s = unit(_ref_projection(loss, fs), 1)
    t = unit(ft, 1)
    valid = (small >= 0) & (small < k)
    a_s = s.permute(0, 2, 3, 1)[valid]
    a_t = t.permute(0, 2, 3, 1)[valid]
    out = {}
    for name, queue in (("cirkd_memory_pixel", pixel_queue), ("cirkd_memory_region", region_queue)):
        bank = queue.reshape(-1, queue.shape[-1])
        rows = kl_rows(a_t @ bank.T / (tau * big_t), a_s @ bank.T / (tau * big_t))
        out[name] = big_t**2 * rows.mean()
    return out


def _memory_loss(k=3, cs=4, ct=6, **over):
    # Contrast sizes ⌊P/K⌋+1 ≥ the queue sizes: every slot takes part, so the loss does not depend on the draw.
    params = dict(minibatch_pixel_weight=0.0, memory_pixel_weight=0.3, memory_region_weight=0.7,
                  contrast_temperature=0.5, contrast_kd_temperature=2.0, pixel_memory_size=6, region_memory_size=4,
                  pixel_contrast_size=6 * k, region_contrast_size=4 * k, pixels_per_class=2)
    params.update(over)
    return build("cirkd", cs=cs, ct=ct, k=k, **params)


def test_cirkd_memory_matches_reference_and_enqueues_after_the_loss():
    k = 3
    fs, ft, small, targets = make_batch(k=k)
    fs.requires_grad_(True)
    ft.requires_grad_(True)
    loss = _memory_loss(k=k).train()
    pq, rq = loss.pixel_queue.clone(), loss.region_queue.clone()
    out = loss(seg(fs), seg(ft), targets)
    assert set(out) == {"cirkd_memory_pixel", "cirkd_memory_region"}
    fs_ref = fs.detach().clone().requires_grad_(True)
    params = list(loss.project.parameters())
    ref = _ref_memory(loss, fs_ref, ft.detach(), small, pq, rq, 0.5, 2.0, k)
    torch.testing.assert_close(out["cirkd_memory_pixel"], 0.3 * ref["cirkd_memory_pixel"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["cirkd_memory_region"], 0.7 * ref["cirkd_memory_region"], rtol=1e-10,
                               atol=1e-12)
    assert not torch.equal(loss.region_queue, rq)  # the batch was enqueued, after the loss used the old memory

    ref_total = 0.3 * ref["cirkd_memory_pixel"] + 0.7 * ref["cirkd_memory_region"]
    ref_grads = torch.autograd.grad(ref_total, [fs_ref, *params])
    sum(out.values()).backward()
    torch.testing.assert_close(fs.grad, ref_grads[0], rtol=1e-8, atol=1e-12)
    for p, gr in zip(params, ref_grads[1:]):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, gr, rtol=1e-8, atol=1e-12)
    assert ft.grad is None  # (ignored pixels are no anchors, but still reach BatchNorm's batch statistics)


def test_cirkd_full_recipe_terms_and_gradients():
    k = 3
    fs, ft, small, targets = make_batch(k=k)
    fs.requires_grad_(True)
    loss = _memory_loss(k=k, minibatch_pixel_weight=1.0)
    out = loss(seg(fs), seg(ft), targets)
    assert set(out) == {"cirkd_minibatch_pixel", "cirkd_memory_pixel", "cirkd_memory_region"}
    torch.testing.assert_close(out["cirkd_minibatch_pixel"], _ref_minibatch(fs.detach(), ft, 0.5), rtol=1e-10,
                               atol=1e-12)
    sum(out.values()).backward()
    assert torch.isfinite(fs.grad).all() and fs.grad.abs().sum() > 0


def test_cirkd_minibatch_only_has_no_memory_state():
    loss = build("cirkd", memory_pixel_weight=0.0, memory_region_weight=0.0)
    assert loss.project is None and len(list(loss.buffers())) == 0
    fs, ft, _, _ = make_batch()
    assert set(loss(seg(fs), seg(ft))) == {"cirkd_minibatch_pixel"}  # no labels needed


def test_cirkd_all_pixels_ignored_gives_zero_and_finite_gradients():
    fs, ft, _, targets = make_batch()
    targets.fill_(IGNORE)
    fs.requires_grad_(True)
    loss = _memory_loss().train()
    pq, rq, pp, rp = (loss.pixel_queue.clone(), loss.region_queue.clone(), loss.pixel_queue_ptr.clone(),
                      loss.region_queue_ptr.clone())
    out = loss(seg(fs), seg(ft), targets)
    assert all(v == 0 for v in out.values())
    sum(out.values()).backward()
    assert torch.isfinite(fs.grad).all() and fs.grad.abs().sum() == 0
    # Nothing labelled, nothing enqueued.
    assert torch.equal(loss.pixel_queue, pq) and torch.equal(loss.region_queue, rq)
    assert torch.equal(loss.pixel_queue_ptr, pp) and torch.equal(loss.region_queue_ptr, rp)


def test_cirkd_queue_contents_after_one_step():
    k, per = 3, 2
    fs, ft, small, targets = make_batch(b=3, k=k)
    loss = _memory_loss(k=k, pixel_memory_size=50, region_memory_size=10, pixels_per_class=per).train()
    loss(seg(fs), seg(ft), targets)
    t = unit(ft, 1)
    for cls in range(k):
        # Region queue: one normalised class mean per image that has the class, in image order.
        means = [unit(t[i][:, small[i] == cls].mean(1), 0) for i in range(3) if (small[i] == cls).any()]
        n = len(means)
        assert int(loss.region_queue_ptr[cls]) == n
        torch.testing.assert_close(loss.region_queue[cls, :n], torch.stack(means), rtol=1e-12, atol=1e-12)
        # Pixel queue: min(count, per) distinct pixels *of this class* per image, in image order.
        slot = 0
        for i in range(3):
            own = t[i][:, small[i] == cls].T  # this image's class-cls pixel embeddings
            m = min(own.shape[0], per)
            entries = loss.pixel_queue[cls, slot:slot + m]
            match = (entries @ own.T).isclose(torch.ones((), dtype=torch.float64)).nonzero()
            assert match.shape[0] == m and len(set(match[:, 1].tolist())) == m, (cls, i)
            slot += m
        assert int(loss.pixel_queue_ptr[cls]) == slot


def test_cirkd_eval_mode_leaves_memory_alone_and_state_is_in_the_state_dict():
    fs, ft, _, targets = make_batch()
    loss = _memory_loss().eval()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss(seg(fs), seg(ft), targets)
    after = loss.state_dict()
    for key in ("pixel_queue", "pixel_queue_ptr", "region_queue", "region_queue_ptr"):
        assert key in after and torch.equal(after[key], before[key])
    loss.train()(seg(fs), seg(ft), targets)
    fresh = _memory_loss()
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.pixel_queue, loss.pixel_queue)
    assert torch.equal(fresh.region_queue_ptr, loss.region_queue_ptr)


def _reference_fifo(queue, ptr, entries, keep):
    queue, ptr = queue.clone(), ptr.clone()
    for c in range(queue.shape[0]):
        for e in range(entries.shape[1]):
            if keep[c, e]:
                queue[c, ptr[c]] = entries[c, e]
                ptr[c] = (ptr[c] + 1) % queue.shape[1]
    return queue, ptr


def test_fifo_enqueue_wraps_around_like_a_ring_buffer():
    g = torch.Generator().manual_seed(5)
    k, m, c = 4, 5, 3
    queue = torch.randn(k, m, c, generator=g)
    ptr = torch.zeros(k, dtype=torch.long)
    ref_q, ref_p = queue.clone(), ptr.clone()
    for e in (3, 4, 2, 7, 12, 1, 0, 5):  # includes calls with more entries than slots (only the last m survive)
        entries = torch.randn(k, e, c, generator=g)
        keep = torch.rand(k, e, generator=g) < 0.7
        keep[0] = True  # one class always full, to force several wrap-arounds
        fifo_enqueue(queue, ptr, entries, keep)
        ref_q, ref_p = _reference_fifo(ref_q, ref_p, entries, keep)
        assert torch.equal(ptr, ref_p)
        assert torch.equal(queue, ref_q)


def test_sample_class_pixels_takes_random_pixels_of_the_class():
    g = torch.Generator().manual_seed(7)
    k, per = 4, 3
    labels = torch.randint(0, k, (2, 40), generator=g)
    labels[0, :6] = IGNORE
    labels[1, labels[1] == 3] = 0  # class 3 absent from image 1
    labels[1, 5] = 3  # … but for one pixel
    seen: set[int] = set()
    torch.manual_seed(0)
    for _ in range(10):
        index, keep = sample_class_pixels(labels, k, per)
        assert index.shape == keep.shape == (2, k, per)
        for b in range(2):
            for cls in range(k):
                count = int((labels[b] == cls).sum())
                chosen = index[b, cls][keep[b, cls]].tolist()
                assert len(chosen) == min(count, per) and len(set(chosen)) == len(chosen)
                assert all(int(labels[b, i]) == cls for i in chosen)
        seen.update(index[0, 0][keep[0, 0]].tolist())
    assert len(seen) > per  # the draw changes from call to call


# ------------------------------------------------------------------------------------------------ DDP gather


def _ddp_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial memory on every rank
        loss = _memory_loss(pixel_memory_size=50, region_memory_size=10).train()
        fs, ft, _, targets = make_batch(b=2, seed=10 + rank)
        torch.manual_seed(100 + rank)  # different pixel draws per rank
        loss(seg(fs), seg(ft), targets)
        torch.save({k: v for k, v in loss.state_dict().items() if "queue" in k}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_cirkd_memory_gathers_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # every rank keeps the same memory
    # Rank-major order: the region entries are rank 0's images, then rank 1's.
    torch.manual_seed(0)
    single = _memory_loss(pixel_memory_size=50, region_memory_size=10).train()
    fs = torch.cat([make_batch(b=2, seed=10 + r)[0] for r in (0, 1)])
    ft = torch.cat([make_batch(b=2, seed=10 + r)[1] for r in (0, 1)])
    targets = torch.cat([make_batch(b=2, seed=10 + r)[3] for r in (0, 1)])
    single(seg(fs), seg(ft), targets)
    torch.testing.assert_close(r0["region_queue"], single.region_queue, rtol=1e-12, atol=1e-12)
    assert torch.equal(r0["region_queue_ptr"], single.region_queue_ptr)
    assert torch.equal(r0["pixel_queue_ptr"], single.pixel_queue_ptr)


# ------------------------------------------------------------------------------------------------ precision, GPU


def test_float32_under_bfloat16_autocast_stays_close_to_float64():
    fs, ft, _, targets = make_batch()
    for name, params in (("cirkd", {"pixel_memory_size": 30, "region_memory_size": 8}), ("skd", {}),
                         ("ifvd", {}), ("at", {}), ("fitnet", {})):
        torch.manual_seed(0)
        ref = build(name, **params).eval()
        torch.manual_seed(0)
        low = build_loss(name, params, student_channels=4, teacher_channels=6, num_classes=3).eval()
        low.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
        expect = ref(seg(fs), seg(ft), targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = low(seg(fs.float()), seg(ft.bfloat16()), targets)
        for key in expect:
            assert got[key].dtype == torch.float32, key
            torch.testing.assert_close(got[key].double(), expect[key], rtol=0.05, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    dev = torch.device("cuda")
    fs, ft, _, targets = make_batch(b=2, h=16, w=16)
    fs, ft, targets = fs.float().to(dev).requires_grad_(True), ft.float().to(dev), targets.to(dev)
    for name, params in (("cirkd", {"pixel_memory_size": 200, "region_memory_size": 20}), ("skd", {}),
                         ("ifvd", {}), ("at", {}), ("fitnet", {})):
        loss = build_loss(name, params, student_channels=4, teacher_channels=6, num_classes=3).to(dev).train()
        loss(seg(fs), seg(ft), targets)  # warm-up (lazy initialisation may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = loss(seg(fs), seg(ft), targets)
            torch.stack(list(out.values())).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
