"""CutMix: box geometry, alignment of every mixed map, p=0 / p=1, reproducibility."""

from __future__ import annotations

import pytest
import torch

from brpg_lightning.methods.cutmix import apply_cutmix, cutmix_box


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box_extent(box: torch.Tensor) -> tuple[int, int]:
    """Height and width of the box; asserts it is one filled rectangle."""
    rows = box.any(dim=1).nonzero().flatten()
    cols = box.any(dim=0).nonzero().flatten()
    h, w = len(rows), len(cols)
    assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w  # contiguous
    assert int(box.sum()) == h * w  # filled
    return h, w


@pytest.mark.parametrize(("height", "width"), [(321, 321), (64, 48), (10, 7), (33, 100)])
def test_box_area_is_half_within_rounding(height: int, width: int) -> None:
    for seed in range(20):
        box = cutmix_box(height, width, gen(seed))
        assert box.shape == (height, width) and box.dtype == torch.bool
        h, w = box_extent(box)
        assert width // 2 + 1 <= w < width  # U2PL: w uniform in [int(W/2) + 1, W)
        assert abs(h * w - height * width / 2) <= w / 2  # h = round(HW/2 / w)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 2), (1, 5), (3, 1), (2, 3)])
def test_tiny_sizes_do_not_crash(height: int, width: int) -> None:
    for seed in range(5):
        box = cutmix_box(height, width, gen(seed))
        assert box.shape == (height, width)
        assert int(box.sum()) <= height * width


def encoded_batch(b: int, h: int, w: int):
    """Maps whose value at (i, y, x) encodes the source image i and the position."""
    i = torch.arange(b).view(b, 1, 1)
    y = torch.arange(h).view(1, h, 1)
    x = torch.arange(w).view(1, 1, w)
    code = i * 10000 + y * 100 + x  # (B, H, W)
    images = torch.stack([code.float() + 0.25 * c for c in range(3)], dim=1)  # (B, 3, H, W)
    labels = code.clone()  # long
    confidence = code.double() / 1e5
    logits = torch.stack([-code.float(), code.float()], dim=1)  # (B, 2, H, W)
    valid = (i + y + x) % 2 == 0
    return code, images, labels, confidence, logits, valid


def test_every_map_mixed_with_the_same_boxes() -> None:
    b, h, w = 3, 8, 10
    code, images, labels, confidence, logits, valid = encoded_batch(b, h, w)
    mixed_img, mixed_lab, mixed_conf, mixed_log, mixed_valid, boxes = apply_cutmix(
        images, labels, confidence, logits, valid, p=1.0, generator=gen(0)
    )
    assert boxes.shape == (b, h, w) and boxes.any(dim=(1, 2)).all()
    # reference: a plain loop over pixels
    src_code = torch.empty_like(code)
    src_valid = torch.empty_like(valid)
    for i in range(b):
        for yy in range(h):
            for xx in range(w):
                j = (i + 1) % b if boxes[i, yy, xx] else i
                src_code[i, yy, xx] = code[j, yy, xx]
                src_valid[i, yy, xx] = valid[j, yy, xx]
    for c in range(3):
        assert torch.equal(mixed_img[:, c], src_code.float() + 0.25 * c)
    assert mixed_lab.dtype == torch.long and torch.equal(mixed_lab, src_code)
    assert mixed_conf.dtype == torch.float64 and torch.equal(mixed_conf, src_code.double() / 1e5)
    assert torch.equal(mixed_log, torch.stack([-src_code.float(), src_code.float()], dim=1))
    assert mixed_valid.dtype == torch.bool and torch.equal(mixed_valid, src_valid)


def test_p0_is_identity() -> None:
    _, images, labels, confidence, _, _ = encoded_batch(2, 6, 6)
    for seed in range(10):
        out_img, out_lab, out_conf, boxes = apply_cutmix(
            images, labels, confidence, p=0.0, generator=gen(seed)
        )
        assert (
            torch.equal(out_img, images)
            and torch.equal(out_lab, labels)
            and torch.equal(out_conf, confidence)
        )
        assert not boxes.any()


def test_p1_always_mixes() -> None:
    _, images, labels, _, _, _ = encoded_batch(2, 16, 16)
    for seed in range(10):
        out_img, out_lab, boxes = apply_cutmix(images, labels, p=1.0, generator=gen(seed))
        assert boxes.any(dim=(1, 2)).all()
        assert not torch.equal(out_img, images) and not torch.equal(out_lab, labels)


def test_coin_is_flipped_once_per_batch() -> None:
    _, images, _, _, _, _ = encoded_batch(4, 8, 8)
    fired = []
    for seed in range(200):
        _, boxes = apply_cutmix(images, p=0.5, generator=gen(seed))
        per_image = boxes.any(dim=(1, 2))
        assert per_image.all() or not per_image.any()  # all images mixed, or none
        fired.append(bool(per_image.all()))
    assert 60 < sum(fired) < 140


def test_seeded_generator_is_reproducible() -> None:
    _, images, labels, _, _, _ = encoded_batch(3, 12, 9)
    first = apply_cutmix(images, labels, p=0.5, generator=gen(42))
    second = apply_cutmix(images, labels, p=0.5, generator=gen(42))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_batch_of_one_pastes_from_itself() -> None:
    _, images, labels, _, _, _ = encoded_batch(1, 8, 8)
    out_img, out_lab, boxes = apply_cutmix(images, labels, p=1.0, generator=gen(0))
    assert boxes.any()
    assert torch.equal(out_img, images) and torch.equal(out_lab, labels)


def test_mismatched_map_raises() -> None:
    _, images, _, _, _, _ = encoded_batch(2, 8, 8)
    with pytest.raises(ValueError, match="does not match"):
        apply_cutmix(images, torch.zeros(2, 8, 7), p=1.0)
