"""CIRKDV2: CIRKD's pixel and region relations plus channel relations (github.com/winycg/CIRKD,
``train_cirkdv2.py`` and ``losses/cirkd_channel.py``; the journal extension of Yang et al., CVPR 2022).

The student's head features f_s first pass a graph-reasoning block (``GCN``, published ``losses/gcn.py``: a
non-local block with q, k, v 1×1 convs C→C/2, softmax(q kᵀ/√(C/2)) v, a 1×1 conv + BN + ReLU back to C, and a
1×1 conv + BN + ReLU on the concatenation [f, block(f)] 2C→C), as published whenever the FitNet weight is > 0.
On g = GCN(f_s) (or f_s itself) and the teacher's features f_t:

- ``cirkdv2_fitnet``: FitNet, MSE(W * g, f_t) through a 1×1 connector C_s→C_t (:class:`~cskd.losses.fitnet.FitNetLoss`).
- ``cirkdv2_minibatch_pixel``, ``cirkdv2_memory_pixel``, ``cirkdv2_memory_region``: CIRKD's pixel-to-pixel and
  pixel-to-region relations, exactly :class:`~cskd.losses.cirkd.CIRKDLoss` (its own projection head and queues).
- Channel relations. Both maps are average-pooled over 4×4 cells (ceil mode); the student's goes through its own
  projection head (1×1 conv C_s→C_t, BN, ReLU, 1×1 conv C_t→C_t, no biases); every channel becomes a vector over
  the d = h'·w' pooled positions, L2-normalised: s, t ∈ ℝ^{B×C_t×d}.

  * ``cirkdv2_minibatch_channel``: for every ordered pair (i, j) of images, S_ij = s_i s_jᵀ (C_t×C_t),
    L = 1/B² Σ_ij 1/C_t Σ_rows KL(softmax(T_ij/τ) ‖ softmax(S_ij/τ)).
  * ``cirkdv2_memory_channel``: a queue of M teacher channel vectors; a random contrast set Q of
    ``channel_contrast_size`` of its entries; with T the relation-KD temperature,
    L = T² / (B·C_t) Σ_rows KL(softmax(t Qᵀ/(τT)) ‖ softmax(s Qᵀ/(τT))).
    Each training step enqueues up to ``channels_enqueued`` (256) random teacher channel vectors of the batch.
  * ``cirkdv2_channel_kd``: mean over B·C_t·d of (s − t)².

All are computed by the fused relation KD of :mod:`cskd.losses.cirkd` (:func:`~cskd.losses.cirkd.relation_kd`),
its ring buffer (:func:`~cskd.losses.cirkd.fifo_enqueue`) and gather.

Published recipes (``scripts/train_cirkdv2/``; all: pixel-wise KD λ 1 τ 1 — the registered ``kd`` loss —,
mini-batch pixel 1, memory pixel 0.1, memory region 0.1 (the trainer's defaults, ``train_cirkdv2.py`` lines
88–95), mini-batch channel 1, memory channel 0.1, channel KD 100, τ = 0.1, T = 1, channel memory 10000,
channel contrast 2048, 256 channels enqueued per step, 4×4 pooling; per script only ``--lambda-fitnet`` differs):

============================================  ==========  ==================================
script (``scripts/train_cirkdv2/…``)           λ_fitnet    batch / lr / iterations
============================================  ==========  ==================================
cityscapes/deeplabv3_resnet18.sh               1           8 / 0.01 / 80000
cityscapes/upernet_resnet18.sh                 1           8 / 0.01 / 80000
cityscapes/deeplabv3_mobilenetv3_small.sh      1           8 / 0.01 / 80000
cityscapes/pspnet_mobilenetv3_small.sh         10          8 / 0.01 / 80000
cityscapes/deeplabv3_mobilevit_xxs.sh          10          8 / 0.0009 / 80000
cityscapes/pspnet_mobilevit_xxs.sh             1           8 / 0.0009 / 80000
ade20k/deeplabv3_resnet18.sh                   1           16 / 0.02 / 80000, crop 512
ade20k/* (other students)                      10 or 1     16 / 0.02 / 80000, crop 512
coco_stuff_164k/deeplabv3_resnet18.sh          10          16 / 0.02 / 80000, crop 512
pascal_voc/* (all four, MobileNetV3 students)  10          16 / 0.02 / 80000, crop 512
============================================  ==========  ==================================

The defaults here are the Cityscapes DeepLabV3-R18 recipe (method ``cirkdv2``); ``cirkdv2_fitnet10`` is the
λ_fitnet = 10 variant (every Pascal VOC script). No script covers MobileNetV2 or PSPNet-R18 students.

Differences from the published code, and why:

- CIRKD's part has the differences listed in :mod:`cskd.losses.cirkd` (class pixels enqueued instead of the first
  pixels of the image, enqueue after the loss, ring buffers, light DDP gather, no host syncs).
- Channel memory, enqueue after the loss (MoCo order) instead of before: the published code enqueues the current
  batch's teacher channels and may then draw them into its own contrast set. ``channel_enqueue = "before"``
  restores the published order (the reference-agreement test uses it).
- Channel memory under DDP: the published code gathers every rank's channels and draws the 256 to enqueue with
  ``torch.randperm`` on each rank's own CPU generator, so with differently seeded ranks the "shared" queues drift
  apart. Here each rank draws ⌊256/W⌋ of its own channels (W ranks) on its device, and the gathered draws enter
  every rank's queue in rank order: identical memory everywhere (same count, 256, when W divides it).
- True ring buffer: the published pointer, when a write would reach the end, writes the last K slots and restarts
  at 0; here writes wrap around modulo M.
- The published module sizes its queue from the feature map at construction (d = h·w/16, wrong when 4 does not
  divide h or w, since the pooling is ceil mode). Here the queue's width is set from the first batch (random unit
  vectors, broadcast from rank 0 under DDP), restored from checkpoints, and a later batch of another pooled size
  is refused.
- No ``.cuda()`` calls; ``nn.BatchNorm2d`` in the GCN and the projection heads (SyncBatchNorm as published under
  the engine's ``sync_bn`` conversion); the published wraps the criteria in their own DistributedDataParallel,
  here they are part of the engine's step module.
- Student features of another spatial size than the teacher's are resized to the teacher's size (bilinear,
  align_corners=False) before the GCN; the published code assumes equal sizes. Channel counts may differ.

Maps of other sizes: the student's features are resized to the teacher's h×w (bilinear, align_corners=False) before
the GCN, FitNet, CIRKD's pixel relations and the channel relations (labels by nearest to that size); widths go
through the GCN/FitNet connectors, channel relations compare C×C matrices after the connector.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.segmentor import SegOutput
from ._spatial import to_teacher_size
from .base import DistillLoss, check_non_negative, check_positive, register_loss
from ..distributed import all_gather_cat
from .cirkd import CIRKDLoss, fifo_enqueue, relation_kd
from ._numerics import compute_dtype, no_autocast
from .fitnet import FitNetLoss


class GCN(nn.Module):
    """The published graph-reasoning block on the student's features (C → C channels; see the module doc)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = channels // 2
        if inner < 1:
            raise ValueError(f"the GCN needs ≥ 2 student channels, got {channels}")
        self.node_k = nn.Conv2d(channels, inner, 1, bias=False)
        self.node_v = nn.Conv2d(channels, inner, 1, bias=False)
        self.node_q = nn.Conv2d(channels, inner, 1, bias=False)
        self.conv1 = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.out_conv = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                      nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q = self.node_q(x).flatten(2).mT  # B×n×C'
        k = self.node_k(x).flatten(2)  # B×C'×n
        v = self.node_v(x).flatten(2).mT  # B×n×C'
        c = k.shape[1]
        attn = torch.softmax(torch.bmm(q * c**-0.5, k), dim=-1)
        y = torch.bmm(attn, v).mT.reshape(b, c, h, w)
        return self.out_conv(torch.cat([x, self.conv1(y)], dim=1))


def _projection_head(cs: int, ct: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct), nn.ReLU(inplace=True),
                         nn.Conv2d(ct, ct, 1, bias=False))


class ChannelRelations(nn.Module):
    """CIRKDV2's channel terms (mini-batch, memory, channel KD) with the channel memory; see the module doc."""

    def __init__(
        self, student_channels: int, teacher_channels: int, *, minibatch_weight: float, memory_weight: float,
        kd_weight: float, memory_size: int, contrast_size: int, enqueued: int, pool: int,
        contrast_temperature: float, contrast_kd_temperature: float, enqueue: Literal["after", "before"],
    ) -> None:
        super().__init__()
        self.minibatch_weight, self.memory_weight, self.kd_weight = minibatch_weight, memory_weight, kd_weight
        self.contrast_size, self.enqueued, self.pool = contrast_size, enqueued, pool
        self.contrast_temperature, self.contrast_kd_temperature = contrast_temperature, contrast_kd_temperature
        self.enqueue = enqueue
        self.project = _projection_head(student_channels, teacher_channels)
        if memory_weight > 0:
            # Width 0 until the first batch fixes d (the pooled map's size); see _ensure_queue.
            self.register_buffer("channel_queue", torch.empty(memory_size, 0))
            self.register_buffer("channel_queue_ptr", torch.zeros(1, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        key = prefix + "channel_queue"
        own = getattr(self, "channel_queue", None)
        saved = state_dict.get(key)
        # Either side may be the unsized memory: a checkpoint of a trained run into a fresh loss, or (the
        # time-budget calibration's restore) the state from before the first batch into a loss that has run.
        if own is not None and saved is not None and saved.shape != own.shape \
                and 0 in (own.shape[1], saved.shape[1]):
            self.channel_queue = own.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.compiler.disable
    @torch.no_grad()
    def _ensure_queue(self, d: int) -> None:
        queue = self.channel_queue
        if queue.shape[1] == d:
            return
        if queue.shape[1] != 0:
            raise ValueError(f"cirkdv2: the channel memory holds vectors of {queue.shape[1]} pooled positions, "
                             f"this batch gives {d}: the training crop (or the pooling) changed")
        fresh = F.normalize(torch.randn(queue.shape[0], d, device=queue.device, dtype=queue.dtype), dim=1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(fresh, 0)
        self.channel_queue = fresh

    def forward(self, fs: Tensor, ft: Tensor) -> dict[str, Tensor]:
        k = self.pool
        fs = F.avg_pool2d(fs, kernel_size=k, stride=k, ceil_mode=True)
        ft = F.avg_pool2d(ft, kernel_size=k, stride=k, ceil_mode=True)
        projected = self.project(fs)
        terms: dict[str, Tensor] = {}
        with no_autocast(projected):
            dtype = compute_dtype(projected, ft)
            s = F.normalize(projected.to(dtype).flatten(2), dim=-1)  # B×C×d
            t = F.normalize(ft.to(dtype).flatten(2), dim=-1)
            b, c, d = s.shape
            if self.minibatch_weight > 0:
                weight = s.new_full((1, 1), 1.0 / (c * b * b))
                pairs = [relation_kd(s[i: i + 1], s, t[i: i + 1], t, weight, self.contrast_temperature)
                         for i in range(b)]
                terms["cirkdv2_minibatch_channel"] = self.minibatch_weight * torch.stack(pairs).sum()
            if self.kd_weight > 0:
                terms["cirkdv2_channel_kd"] = self.kd_weight * (s - t).square().mean()
            if self.memory_weight > 0:
                self._ensure_queue(d)
                if self.training and self.enqueue == "before":
                    self._enqueue(t.detach())
                queue = self.channel_queue
                slots = torch.rand(queue.shape[0], device=queue.device).argsort()[: self.contrast_size]
                bank = queue.index_select(0, slots).to(dtype)[None]
                weight = s.new_full((1, 1), 1.0 / (b * c))
                terms["cirkdv2_memory_channel"] = self.memory_weight * relation_kd(
                    s.reshape(1, b * c, d), bank, t.reshape(1, b * c, d), bank, weight,
                    self.contrast_temperature, self.contrast_kd_temperature)
                if self.training and self.enqueue == "after":
                    self._enqueue(t.detach())
        return terms

    @torch.no_grad()
    def _enqueue(self, t: Tensor) -> None:
        """Up to ⌊enqueued / W⌋ random channel vectors of this rank's batch, gathered over the W ranks."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        keys = t.reshape(-1, t.shape[-1])
        count = min(keys.shape[0], max(1, self.enqueued // world))
        pick = torch.rand(keys.shape[0], device=keys.device).argsort()[:count]
        chosen = all_gather_cat(F.normalize(keys.index_select(0, pick), dim=1))
        keep = torch.ones(1, chosen.shape[0], dtype=torch.bool, device=chosen.device)
        fifo_enqueue(self.channel_queue[None], self.channel_queue_ptr, chosen[None], keep)


@register_loss("cirkdv2")
class CIRKDV2Loss(DistillLoss):
    """CIRKDV2's terms (see the module doc), each already weighted; a term at weight 0 is neither computed nor
    returned (and a part with all its weights at 0 has no modules or memory)."""

    needs_targets = True

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        fitnet_weight: float = 1.0,
        minibatch_pixel_weight: float = 1.0,
        memory_pixel_weight: float = 0.1,
        memory_region_weight: float = 0.1,
        minibatch_channel_weight: float = 1.0,
        memory_channel_weight: float = 0.1,
        channel_kd_weight: float = 100.0,
        contrast_temperature: float = 0.1,
        contrast_kd_temperature: float = 1.0,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixel_contrast_size: int = 4096,
        region_contrast_size: int = 1024,
        pixels_per_class: int = 16,
        channel_memory_size: int = 10000,
        channel_contrast_size: int = 2048,
        channels_enqueued: int = 256,
        channel_pool: int = 4,
        channel_enqueue: Literal["after", "before"] = "after",
    ) -> None:
        super().__init__()
        check_non_negative(fitnet_weight=fitnet_weight, minibatch_pixel_weight=minibatch_pixel_weight,
                           memory_pixel_weight=memory_pixel_weight, memory_region_weight=memory_region_weight,
                           minibatch_channel_weight=minibatch_channel_weight,
                           memory_channel_weight=memory_channel_weight, channel_kd_weight=channel_kd_weight)
        check_positive(contrast_temperature=contrast_temperature, contrast_kd_temperature=contrast_kd_temperature)
        for name, count in (("channel_memory_size", channel_memory_size),
                            ("channel_contrast_size", channel_contrast_size),
                            ("channels_enqueued", channels_enqueued), ("channel_pool", channel_pool),
                            ("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if count < 1:
                raise ValueError(f"{name} must be ≥ 1, got {count}")
        if channel_enqueue not in ("after", "before"):
            raise ValueError(f"channel_enqueue must be 'after' or 'before', got {channel_enqueue!r}")
        pixel = (minibatch_pixel_weight, memory_pixel_weight, memory_region_weight)
        channel = (minibatch_channel_weight, memory_channel_weight, channel_kd_weight)
        if fitnet_weight == 0 and not any(pixel) and not any(channel):
            raise ValueError("all weights are 0: the loss would do nothing")
        self.fitnet_weight = float(fitnet_weight)
        # As published, the GCN transforms the student's features whenever the FitNet term is on.
        self.gcn = GCN(student_channels) if fitnet_weight > 0 else None
        self.fitnet = FitNetLoss(student_channels=student_channels, teacher_channels=teacher_channels,
                                 num_classes=num_classes, weight=fitnet_weight) if fitnet_weight > 0 else None
        self.cirkd = CIRKDLoss(
            student_channels=student_channels, teacher_channels=teacher_channels, num_classes=num_classes,
            minibatch_pixel_weight=minibatch_pixel_weight, memory_pixel_weight=memory_pixel_weight,
            memory_region_weight=memory_region_weight, contrast_temperature=contrast_temperature,
            contrast_kd_temperature=contrast_kd_temperature, pixel_memory_size=pixel_memory_size,
            region_memory_size=region_memory_size, pixel_contrast_size=pixel_contrast_size,
            region_contrast_size=region_contrast_size, pixels_per_class=pixels_per_class,
        ) if any(pixel) else None
        self.channel = ChannelRelations(
            student_channels, teacher_channels, minibatch_weight=float(minibatch_channel_weight),
            memory_weight=float(memory_channel_weight), kd_weight=float(channel_kd_weight),
            memory_size=int(channel_memory_size), contrast_size=int(channel_contrast_size),
            enqueued=int(channels_enqueued), pool=int(channel_pool), contrast_temperature=float(contrast_temperature),
            contrast_kd_temperature=float(contrast_kd_temperature), enqueue=channel_enqueue,
        ) if any(channel) else None

    def forward(self, student: SegOutput, teacher: SegOutput, targets: Tensor | None = None) -> dict[str, Tensor]:
        ft = teacher.features.detach()
        g = to_teacher_size(student.features, ft)
        if self.gcn is not None:
            g = self.gcn(g)
        transformed = SegOutput(student.logits, student.aux_logits, g)
        terms: dict[str, Tensor] = {}
        if self.fitnet is not None:
            terms["cirkdv2_fitnet"] = self.fitnet(transformed, teacher)["fitnet"]
        if self.cirkd is not None:
            for name, value in self.cirkd(transformed, teacher, targets).items():
                terms[name.replace("cirkd_", "cirkdv2_", 1)] = value
        if self.channel is not None:
            terms.update(self.channel(g, ft))
        return terms


__all__ = ["CIRKDV2Loss", "ChannelRelations", "GCN"]
