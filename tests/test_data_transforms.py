"""Joint transforms: fixed output size, nearest-only labels, padding values, image/label alignment, collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from cskd.data import RandomScaleCrop, build_eval_transform, build_train_transform, mean_pixel

# A colour per label value: the image is painted from the label, so any misalignment shows as a colour mismatch.
COLOURS = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40], [40, 220, 220]], dtype=torch.uint8)


def blocky_sample(h: int, w: int, block: int = 8, seed: int = 0) -> dict:
    """Label of random values 0..4 in ``block``×``block`` squares (plus a strip of ignore), image = its colours."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 5, (h // block + 1, w // block + 1), generator=g)
    lab = cells.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w].to(torch.uint8)
    img = COLOURS[lab.long()].permute(2, 0, 1).contiguous()
    lab[:, :block] = 255  # an ignored strip: its colour is whatever the cell had
    return {"image": tv_tensors.Image(img), "mask": tv_tensors.Mask(lab), "name": "x", "index": 7}


def uniform_neighbourhood(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Pixels whose (2r+1)² neighbourhood has a single label (where bilinear resampling cannot mix colours)."""
    m = mask.float()[None, None]
    hi = torch.nn.functional.max_pool2d(m, 2 * r + 1, 1, r)
    lo = -torch.nn.functional.max_pool2d(-m, 2 * r + 1, 1, r)
    return (hi == lo)[0, 0]


@pytest.mark.parametrize("src,crop", [((64, 128), (32, 48)), ((20, 24), (48, 64)), ((64, 32), (40, 40))])
def test_train_output_is_fixed_size_uint8(src, crop):
    t = build_train_transform(crop, scale_range=(0.5, 2.0))
    torch.manual_seed(0)
    for seed in range(8):
        out = t(blocky_sample(*src, seed=seed))
        assert out["image"].shape == (3, *crop) and out["image"].dtype == torch.uint8
        assert out["mask"].shape == crop and out["mask"].dtype == torch.uint8
        assert isinstance(out["image"], tv_tensors.Image) and isinstance(out["mask"], tv_tensors.Mask)
        assert out["name"] == "x" and out["index"] == 7


def test_labels_are_never_interpolated():
    t = build_train_transform((40, 56), scale_range=(0.5, 2.0))
    torch.manual_seed(1)
    for seed in range(20):
        out = t(blocky_sample(48, 64, block=3, seed=seed))
        assert set(out["mask"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}


def test_image_and_label_stay_aligned_through_scale_crop_flip():
    t = build_train_transform((48, 64), scale_range=(0.5, 2.0), hflip=True)
    torch.manual_seed(2)
    checked = 0
    for seed in range(24):
        out = t(blocky_sample(64, 96, block=8, seed=seed))
        mask, img = out["mask"], out["image"]
        ok = uniform_neighbourhood(mask, 2) & (mask != 255)
        want = COLOURS[mask[ok].long()]
        got = img.permute(1, 2, 0)[ok]
        assert (got.int() - want.int()).abs().max() <= 1
        checked += int(ok.sum())
    assert checked > 10_000


def test_padding_values():
    # scale fixed at 0.5: a 32×40 image becomes 16×20 inside a 40×48 crop, the rest is padding
    t = RandomScaleCrop((40, 48), scale_range=(0.5, 0.5))
    torch.manual_seed(3)
    sample = blocky_sample(32, 40)
    sample["mask"][:, :8] = 0  # no ignored strip here: every content pixel has a label
    out = t(sample)
    content = out["mask"] != 255
    rows, cols = content.any(1).nonzero().flatten(), content.any(0).nonzero().flatten()
    assert len(rows) == 16 and len(cols) == 20 and int(content.sum()) == 16 * 20  # one solid rectangle
    fill = torch.tensor(mean_pixel(), dtype=torch.uint8)
    assert (out["image"].permute(1, 2, 0)[~content] == fill).all()


def test_scale_range_is_respected():
    # content size after a fixed scale of 2: a 10×12 image fills 20×24 of a 30×30 crop
    t = RandomScaleCrop((30, 30), scale_range=(2.0, 2.0))
    sample = blocky_sample(10, 12, block=2)
    sample["mask"][:] = 1
    out = t(sample)
    assert int((out["mask"] == 1).sum()) == 20 * 24


def test_no_flip_and_eval_identity():
    s = blocky_sample(24, 32)
    t = build_train_transform((24, 32), scale_range=(1.0, 1.0), hflip=False)
    out = t(s)
    assert torch.equal(out["image"], s["image"]) and torch.equal(out["mask"], s["mask"])
    e = build_eval_transform()(s)
    assert e["image"] is s["image"] and e["mask"] is s["mask"]


def test_unlabelled_sample_and_bad_arguments():
    s = blocky_sample(24, 32)
    del s["mask"]
    out = build_train_transform((16, 16))(s)
    assert out["image"].shape == (3, 16, 16) and "mask" not in out
    with pytest.raises(ValueError):
        RandomScaleCrop((0, 16))
    with pytest.raises(ValueError):
        RandomScaleCrop((16, 16), scale_range=(2.0, 1.0))


class _Blocks(Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return self.transform(blocky_sample(20 + 4 * i, 30 + 6 * i, seed=i))


def test_batches_collate_to_fixed_size():
    loader = DataLoader(_Blocks(build_train_transform((24, 32))), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 24, 32) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (4, 24, 32) and batch["name"] == ["x"] * 4


def test_same_seed_same_augmentation():
    t = build_train_transform((24, 32))
    torch.manual_seed(5)
    a = t(blocky_sample(40, 50))
    torch.manual_seed(5)
    b = t(blocky_sample(40, 50))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert np.array_equal(a["mask"].numpy(), b["mask"].numpy())
