"""Bank masks (Sec. 3.4.1) and point sampling for L_pro (Eq. 17-18)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from brpg_lightning.brpg.sampling import (
    bank_masks,
    downsample_labels,
    gather_points,
    grid_points,
    grid_positions,
    random_points,
    random_subset,
    sample_grid,
    sample_points,
    sample_points_grid_sample,
)
from brpg_lightning.constants import IGNORE_INDEX

# one image, 1 x 5 pixels, 3 classes; worked by hand below
PROBS = (
    torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.1, 0.85, 0.05], [0.2, 0.1, 0.7], [0.05, 0.15, 0.8]])
    .t()
    .reshape(1, 3, 1, 5)
)
LABELS = torch.tensor([[[0, 0, 0, IGNORE_INDEX, 2]]])


def test_bank_masks_labeled_by_hand() -> None:
    high, low, pred, conf = bank_masks(PROBS, LABELS, 0.8)
    # p0 correct 0.9 -> high; p1 correct 0.6 -> low; p2 wrong; p3 ignored; p4 correct, 0.8 >= 0.8 -> high
    assert high.flatten().tolist() == [True, False, False, False, True]
    assert low.flatten().tolist() == [False, True, False, False, False]
    assert pred.flatten().tolist() == [0, 0, 1, 2, 2]
    assert torch.allclose(conf.flatten(), torch.tensor([0.9, 0.6, 0.85, 0.7, 0.8]))


def test_bank_masks_class_specific_thresholds_by_hand() -> None:
    eta = torch.tensor([0.95, 0.5, 0.85])
    high, low, _, _ = bank_masks(PROBS, LABELS, eta)  # eta read at the label
    assert high.flatten().tolist() == [False, False, False, False, False]
    assert low.flatten().tolist() == [True, True, False, False, True]
    high_u, low_u, _, _ = bank_masks(PROBS, None, eta)  # eta read at the prediction
    assert low_u is None
    assert high_u.flatten().tolist() == [False, False, True, False, False]


def test_bank_masks_unlabeled_by_hand() -> None:
    high, low, _, _ = bank_masks(PROBS, None, 0.8)
    assert low is None
    assert high.flatten().tolist() == [True, False, True, False, True]


def test_grid_points_by_hand() -> None:
    coords = grid_points(2, 64, 64, grid=4)
    positions = [0, 15, 30, 45]  # i * ((64 - 1) // 4) = i * 15
    expected = [[y, x] for y in positions for x in positions]
    assert coords.shape == (2, 16, 2) and coords.dtype == torch.long
    assert coords[0].tolist() == expected and coords[1].tolist() == expected
    rect = grid_points(1, 10, 7, grid=3)  # y: step 9 // 3 = 3; x: step 6 // 3 = 2 (each axis its own size)
    assert sorted({y for y, _ in rect[0].tolist()}) == [0, 3, 6]
    assert sorted({x for _, x in rect[0].tolist()}) == [0, 2, 4]


def test_grid_points_are_the_official_positions_at_513_and_769() -> None:
    """The paper's 32 x 32 count at the official code's positions ``i * ((H - 1) // 32)`` (which adds H - 1)."""
    at_513 = list(range(0, 497, 16))  # step 512 // 32 = 16: 0, 16, ..., 496
    at_769 = list(range(0, 745, 24))  # step 768 // 32 = 24: 0, 24, ..., 744
    assert len(at_513) == len(at_769) == 32 and at_513[-1] == 496 and at_769[-1] == 744
    assert grid_positions(513, 32).tolist() == at_513 and grid_positions(769, 32).tolist() == at_769
    official_513 = [i * 16 for i in range(32)] + [512]  # train_semi.py's sample_id at h = 513
    assert set(at_513) == set(official_513) - {512}
    coords = grid_points(1, 513, 769, 32)[0]  # y over 513 rows, x over 769 columns
    assert coords.shape == (1024, 2)
    assert coords[:32].tolist() == [[0, x] for x in at_769]  # row-major, y outer
    assert coords[::32, 0].tolist() == at_513 and coords[-1].tolist() == [496, 744]


def test_grid_points_need_more_pixels_than_points() -> None:
    assert grid_positions(33, 32).tolist() == list(range(32))  # step 1
    with pytest.raises(ValueError, match="more than 32 pixels"):
        grid_points(1, 32, 64, 32)  # step 31 // 32 = 0 would put every row at 0


@pytest.mark.parametrize("num", [5, 40, 200])
def test_random_points_picks_distinct_candidates(num: int) -> None:
    gen = torch.Generator().manual_seed(0)
    cand = torch.rand(3, 9, 11, generator=gen) < 0.3
    cand[2] = False  # an image without candidates
    coords, valid = random_points(cand, num, generator=torch.Generator().manual_seed(1))
    assert coords.shape == (3, num, 2) and valid.shape == (3, num)
    for b in range(3):
        n_cand = int(cand[b].sum())
        assert int(valid[b].sum()) == min(num, n_cand)
        picked = coords[b][valid[b]].tolist()
        assert len({tuple(p) for p in picked}) == len(picked)  # no duplicates
        assert all(bool(cand[b, y, x]) for y, x in picked)  # never a non-candidate
        assert valid[b].tolist() == sorted(valid[b].tolist(), reverse=True)  # valid rows first
        assert (coords[b][~valid[b]] == 0).all()


def test_random_points_is_uniform_over_candidates() -> None:
    cand = torch.zeros(1, 4, 4, dtype=torch.bool)
    cand[0, :2] = True  # 8 candidates, 2 drawn each time
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(4, 4)
    for _ in range(2000):
        coords, valid = random_points(cand, 2, generator=gen)
        for y, x in coords[0][valid[0]].tolist():
            hits[y, x] += 1
    assert hits[2:].sum() == 0
    assert torch.allclose(hits[:2] / 2000, torch.full((2, 4), 0.25), atol=0.04)  # 2/8 each


def test_random_subset() -> None:
    assert random_subset(4, 10).tolist() == [0, 1, 2, 3]
    idx = random_subset(100, 30, generator=torch.Generator().manual_seed(0))
    assert idx.numel() == 30 and idx.unique().numel() == 30 and 0 <= idx.min() and idx.max() < 100


def _upsampled(fmap: torch.Tensor, size: tuple[int, int], stride: int, align_corners: bool) -> torch.Tensor:
    """The map at the crop by ``F.interpolate`` alone: the official ``size=(H, W), align_corners=True``, or
    by the stride (``align_corners=False``) then cropped."""
    if align_corners:
        return F.interpolate(fmap, size=size, mode="bilinear", align_corners=True)
    return F.interpolate(fmap, scale_factor=stride, mode="bilinear", align_corners=False)[..., : size[0], : size[1]]


def _reference_upsampled(
    fmap: torch.Tensor, coords: torch.Tensor, size: tuple[int, int], stride: int, align_corners: bool = False
) -> torch.Tensor:
    """The official way: upsample the whole map to the crop, then index each point."""
    up = _upsampled(fmap, size, stride, align_corners)
    return torch.stack([up[b, :, coords[b, :, 0], coords[b, :, 1]].t() for b in range(fmap.shape[0])])


GEOMETRIES = [pytest.param(True, id="align_corners"), pytest.param(False, id="by_stride")]


@pytest.mark.parametrize("align_corners", GEOMETRIES)
@pytest.mark.parametrize("reader", [sample_points, sample_points_grid_sample])  # sparse product | grid_sample
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("height", "width", "stride"),
    [(513, 513, 4), (769, 769, 4), (513, 769, 4), (321, 290, 4), (64, 64, 4), (100, 75, 8)],
)
def test_sample_points_equals_upsample_then_index(
    height: int, width: int, stride: int, dtype: torch.dtype, reader, align_corners: bool
) -> None:
    gen = torch.Generator().manual_seed(height + width)
    h, w = math.ceil(height / stride), math.ceil(width / stride)  # the segmentor's map (129 at 513, 193 at 769)
    fmap = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64).to(dtype)
    ys = torch.randint(0, height, (2, 300), generator=gen)
    xs = torch.randint(0, width, (2, 300), generator=gen)
    borders = torch.tensor(
        [[0, 0], [0, width - 1], [height - 1, 0], [height - 1, width - 1], [1, 2], [height - 2, 3]]
    )
    coords = torch.cat([torch.stack([ys, xs], -1), borders.expand(2, -1, -1)], dim=1)
    got = reader(fmap, coords, stride, align_corners=align_corners, size=(height, width))
    assert got.shape == (2, coords.shape[1], 3)
    expected = _reference_upsampled(fmap, coords, (height, width), stride, align_corners)
    # float64: the same numbers; float32: positions round-trip through [-1, 1] (~1e-5 of a map pixel)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_align_corners_reads_map_pixels_at_every_fourth_crop_pixel_at_513() -> None:
    """Hand-worked: at 513 with the segmentor's 129-pixel map, ``p (129 - 1) / (513 - 1) = p / 4``: crop pixel
    ``4k`` is map pixel ``k`` exactly, ``4k + 2`` the mean of ``k`` and ``k + 1``; by the stride it would read
    ``(4k + 2.5) / 4 - 0.5 = k + 0.125``."""
    fmap = torch.arange(129.0, dtype=torch.float64).view(1, 1, 129, 1).expand(1, 1, 129, 129).contiguous()
    coords = torch.tensor([[[0, 0], [4, 0], [8, 0], [10, 0], [512, 0], [508, 0]]])
    got = sample_points(fmap, coords, 4, align_corners=True, size=(513, 513))[0, :, 0]
    assert got.tolist() == [0.0, 1.0, 2.0, 2.5, 128.0, 127.0]
    by_stride = sample_points(fmap, coords, 4)[0, :, 0]
    assert by_stride.tolist() == [0.0, 0.625, 1.625, 2.125, 127.625, 126.625]


def test_align_corners_reads_need_the_input_size() -> None:
    fmap, coords = torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 2, dtype=torch.long)
    for reader in (sample_points, sample_points_grid_sample):
        with pytest.raises(ValueError, match="input size"):
            reader(fmap, coords, 4, align_corners=True)


@pytest.mark.parametrize("align_corners", GEOMETRIES)
@pytest.mark.parametrize("reader", [sample_points, sample_points_grid_sample])
def test_sample_points_gradient_equals_upsample_then_index(reader, align_corners: bool) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 3, 129, 129, generator=gen, requires_grad=True)
    coords = torch.randint(0, 513, (2, 200, 2), generator=gen)
    weights = torch.randn(2, 200, 3, generator=gen)
    (reader(fmap, coords, 4, align_corners=align_corners, size=(513, 513)) * weights).sum().backward()
    ours = fmap.grad.clone()
    fmap.grad = None
    (_reference_upsampled(fmap, coords, (513, 513), 4, align_corners) * weights).sum().backward()
    torch.testing.assert_close(ours, fmap.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("align_corners", GEOMETRIES)
@pytest.mark.parametrize(
    ("height", "width", "stride", "grid", "extra_row"),
    [(513, 513, 4, 32, 0), (769, 769, 4, 32, 0), (513, 769, 4, 32, 0), (80, 80, 4, 32, 1),
     (321, 290, 4, 32, 1), (64, 48, 8, 5, 0), (30, 30, 4, 29, 0)],
)
def test_sample_grid_equals_upsample_at_the_grid_points_with_gradient(
    height: int, width: int, stride: int, grid: int, extra_row: int, align_corners: bool
) -> None:
    gen = torch.Generator().manual_seed(height * width + grid)
    # the segmentor's map; extra_row: one more map row, as an uncropped padded forward
    h, w = math.ceil(height / stride) + extra_row, math.ceil(width / stride)
    fmap = torch.randn(3, 4, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    coords = grid_points(3, height, width, grid)
    got = sample_grid(fmap, height, width, grid, stride, align_corners=align_corners)
    expected = _reference_upsampled(fmap, coords, (height, width), stride, align_corners)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((got * weights).sum(), fmap)
    (g_ref,) = torch.autograd.grad((expected * weights).sum(), fmap)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10)


def test_gather_points() -> None:
    maps = torch.randint(0, 20, (2, 7, 9))
    coords = torch.stack([torch.randint(0, 7, (2, 15)), torch.randint(0, 9, (2, 15))], -1)
    expected = torch.tensor([[maps[b, y, x].item() for y, x in coords[b].tolist()] for b in range(2)])
    assert torch.equal(gather_points(maps, coords), expected)


def test_downsample_labels_matches_nearest_interpolate() -> None:
    labels = torch.randint(0, 21, (2, 321, 321))
    labels[:, :10] = IGNORE_INDEX
    got = downsample_labels(labels, (81, 81))
    expected = F.interpolate(labels[:, None].float(), size=(81, 81), mode="nearest")[:, 0].long()
    assert got.dtype == torch.long and torch.equal(got, expected)
    # nearest reads source index floor(i * H / h): check a few by hand
    assert got[0, 5, 7] == labels[0, (5 * 321) // 81, (7 * 321) // 81]


@pytest.mark.parametrize("align_corners", GEOMETRIES)
def test_sample_points_reads_16_bit_maps_in_float32(align_corners: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(1, 4, 81, 81, generator=gen).bfloat16()
    coords = torch.randint(0, 321, (1, 100, 2), generator=gen)
    got = sample_points(fmap, coords, 4, align_corners=align_corners, size=(321, 321))
    assert got.dtype == torch.float32
    expected = _reference_upsampled(fmap.double(), coords, (321, 321), 4, align_corners).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
