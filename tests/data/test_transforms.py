"""Weak/strong/val transforms: alignment, padding, shapes/dtypes, strong view geometry, torch-RNG seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brpg_lightning.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from brpg_lightning.data.transforms import LabeledTransform, UnlabeledTransform, ValTransform
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import EvalProtocol

PALETTE = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], np.uint8)
NO_STRONG = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
UINT8_ATOL = 0.5 / 255 + 1e-4  # the strong view is uint8 (albumentations): rounded to the nearest level


def _denormalize(x: torch.Tensor) -> np.ndarray:
    """float32 (3, H, W) normalised -> float (H, W, 3) in 0..255 (independent of the implementation)."""
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    return (x.permute(1, 2, 0).numpy() * std + mean) * 255.0


def _block_scene(seed: int = 0, blocks: tuple[int, int] = (8, 6), cell: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Mask of ``cell`` x ``cell`` blocks of random classes 0..3 and the image whose colour encodes the class."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 4, blocks), np.ones((cell, cell), np.int64)).astype(np.uint8)
    return PALETTE[mask], mask


def _uniform_3x3(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood (inside the array) holds a single value; border pixels are False."""
    padded = np.pad(mask.astype(np.int64), 1, constant_values=-1)
    h, w = mask.shape
    same = np.ones((h, w), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == mask
    return same


def test_image_and_mask_stay_aligned_under_scale_flip_crop() -> None:
    image, mask = _block_scene()
    transform = LabeledTransform(crop_size=40)  # 64x48 rescaled by 0.5..2: sometimes padded, sometimes cropped
    torch.manual_seed(0)
    padded_pixels = 0
    for _ in range(40):
        out = transform(image, mask)
        img, m = _denormalize(out["image"]), out["mask"].numpy()
        interior = _uniform_3x3(m) & (m != IGNORE_INDEX)
        assert interior.sum() > 0.3 * (m != IGNORE_INDEX).sum()
        np.testing.assert_allclose(img[interior], PALETTE[m[interior]].astype(float), atol=2.0)
        pad = m == IGNORE_INDEX
        np.testing.assert_allclose(img[pad], 0.0, atol=1e-3)  # padded image pixels are 0
        padded_pixels += int(pad.sum())
    assert padded_pixels > 0


def test_flip_only_mirrors_image_and_mask() -> None:
    image, mask = _block_scene(blocks=(4, 4))  # 32 x 32
    out = LabeledTransform(crop_size=32, scale_range=(1.0, 1.0), flip_p=1.0)(image, mask)
    np.testing.assert_array_equal(out["mask"].numpy(), mask[:, ::-1])
    np.testing.assert_allclose(_denormalize(out["image"]), image[:, ::-1].astype(float), atol=1e-3)


def test_rescale_by_two_repeats_every_mask_pixel() -> None:
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 4, (16, 16)).astype(np.uint8)
    out = LabeledTransform(crop_size=32, scale_range=(2.0, 2.0), flip_p=0.0)(PALETTE[mask], mask)
    np.testing.assert_array_equal(out["mask"].numpy(), np.kron(mask, np.ones((2, 2), np.uint8)))


def test_small_image_is_padded_with_ignore_and_invalid() -> None:
    rng = np.random.default_rng(2)
    mask = rng.integers(0, 4, (32, 32)).astype(np.uint8)
    image = PALETTE[mask]
    labeled = LabeledTransform(crop_size=24, scale_range=(0.5, 0.5), flip_p=0.0)(image, mask)
    m = labeled["mask"].numpy()
    # 32 -> 16 px; PIL nearest samples source pixel floor((x + 0.5) * 2) = 2x + 1; then padded to 24
    expected = np.full((24, 24), IGNORE_INDEX, np.uint8)
    expected[:16, :16] = mask[1::2, 1::2]
    np.testing.assert_array_equal(m, expected)
    unlabeled = UnlabeledTransform(crop_size=24, scale_range=(0.5, 0.5), flip_p=0.0)(image, None)
    np.testing.assert_array_equal(unlabeled["valid"].numpy(), expected != IGNORE_INDEX)
    np.testing.assert_allclose(_denormalize(unlabeled["image"])[16:], 0.0, atol=1e-3)


def test_output_shapes_and_dtypes() -> None:
    image, mask = _block_scene()
    lab = LabeledTransform(crop_size=24)(image, mask)
    assert lab["image"].shape == (3, 24, 24) and lab["image"].dtype == torch.float32
    assert lab["mask"].shape == (24, 24) and lab["mask"].dtype == torch.int64
    unl = UnlabeledTransform(crop_size=24)(image, None)
    assert set(unl) == {"image", "image_strong", "valid"}
    assert unl["image"].shape == unl["image_strong"].shape == (3, 24, 24)
    assert unl["image"].dtype == unl["image_strong"].dtype == torch.float32
    assert unl["valid"].shape == (24, 24) and unl["valid"].dtype == torch.bool
    val = ValTransform()(image, mask)
    assert val["image"].shape == (3, 64, 48) and val["image"].dtype == torch.float32
    assert val["mask"].dtype == torch.int64


def test_strong_view_without_colour_ops_equals_weak_view() -> None:
    image, _ = _block_scene()
    torch.manual_seed(3)
    for _ in range(5):
        out = UnlabeledTransform(crop_size=40, strong=NO_STRONG)(image)
        assert torch.equal(out["image"], out["image_strong"])


def test_strong_grayscale_is_the_weak_crop_in_grey() -> None:
    image, _ = _block_scene()
    torch.manual_seed(4)
    out = UnlabeledTransform(crop_size=40, strong={**NO_STRONG, "grayscale_p": 1.0})(image)
    weak = _denormalize(out["image"]) / 255.0
    grey = weak @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma
    strong = _denormalize(out["image_strong"]) / 255.0
    for c in range(3):
        np.testing.assert_allclose(strong[..., c], grey, atol=UINT8_ATOL)


def test_strong_blur_matches_scipy_gaussian_on_the_same_crop() -> None:
    image, _ = _block_scene()
    torch.manual_seed(5)
    out = UnlabeledTransform(crop_size=40, strong={**NO_STRONG, "blur_p": 1.0, "blur_sigma": (1.0, 1.0)})(image)
    weak = _denormalize(out["image"]) / 255.0
    # kernel 2 * ceil(3 sigma) + 1 = 7 (radius 3 = truncate 3.0); torch "reflect" padding = scipy "mirror"
    expected = np.stack([gaussian_filter(weak[..., c], 1.0, truncate=3.0, mode="mirror") for c in range(3)], -1)
    np.testing.assert_allclose(_denormalize(out["image_strong"]) / 255.0, expected, atol=UINT8_ATOL)


def test_default_strong_view_changes_colours_but_not_geometry() -> None:
    image, _ = _block_scene()
    torch.manual_seed(6)
    changed = 0
    for _ in range(20):
        out = UnlabeledTransform(crop_size=40)(image)
        changed += int(not torch.allclose(out["image"], out["image_strong"]))
        assert out["image_strong"].shape == out["image"].shape
    assert changed >= 15  # P(no colour op) = 0.2 * 0.8 * 0.5 = 0.08 per item


def test_transforms_draw_from_torch_global_rng() -> None:
    image, mask = _block_scene()
    transform = UnlabeledTransform(crop_size=32)
    torch.manual_seed(7)
    first = transform(image)
    torch.manual_seed(7)
    again = transform(image)
    torch.manual_seed(8)
    other = transform(image)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["image"], other["image"])


@pytest.mark.parametrize("protocol", [EvalProtocol("whole"), EvalProtocol("sliding", 6)])
def test_val_whole_keeps_the_image(protocol: EvalProtocol) -> None:
    image, mask = _block_scene()  # sliding: the module runs the windows over the whole image
    out = ValTransform(protocol)(image, mask)
    np.testing.assert_allclose(_denormalize(out["image"]), image.astype(float), atol=1e-3)
    np.testing.assert_array_equal(out["mask"].numpy(), mask)


def test_val_center_crop_and_padding() -> None:
    rng = np.random.default_rng(9)
    mask = rng.integers(0, 4, (10, 12)).astype(np.uint8)
    out = ValTransform(EvalProtocol("center_crop", 6))(PALETTE[mask], mask)
    np.testing.assert_array_equal(out["mask"].numpy(), mask[2:8, 3:9])  # offsets (10-6)//2, (12-6)//2
    small = mask[:4, :5]
    out = ValTransform(EvalProtocol("center_crop", 6))(PALETTE[small], small)
    expected = np.full((6, 6), IGNORE_INDEX, np.uint8)
    expected[:4, :5] = small
    np.testing.assert_array_equal(out["mask"].numpy(), expected)
    np.testing.assert_allclose(_denormalize(out["image"])[4:], 0.0, atol=1e-3)


@pytest.mark.parametrize("make", [
    lambda: ValTransform(EvalProtocol("tiles")),
    lambda: ValTransform(EvalProtocol("center_crop", None)),
    lambda: LabeledTransform(crop_size=0),
    lambda: UnlabeledTransform(crop_size=8, strong={"blur_p": 1.5}),
])
def test_bad_transform_arguments_are_one_line_errors(make) -> None:
    with pytest.raises(BRPGInputError) as err:
        make()
    assert "\n" not in str(err.value)
