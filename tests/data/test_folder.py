"""FolderDataset: reading the layout, and one-line errors naming the path/value."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brpg_lightning.data.datasets.folder import FolderDataset
from brpg_lightning.errors import BRPGInputError


def _error(fn: Callable[[], object]) -> str:
    with pytest.raises(BRPGInputError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_items_are_sorted_rgb_uint8_with_uint8_masks(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree(n_labeled=3, size=(6, 7))
    # a grey JPEG image joins the labeled set (name sorts last): converted to RGB
    grey = np.full((6, 7), 128, np.uint8)
    Image.fromarray(grey).save(root / "labeled" / "images" / "z_grey.jpg", quality=100)
    mask = np.array([[0, 1, 2, 255, 0, 1, 2]] * 6, np.uint8)
    Image.fromarray(mask).save(root / "labeled" / "masks" / "z_grey.png")

    ds = FolderDataset(root, "labeled", num_classes=3)
    assert ds.names == ["l_00", "l_01", "l_02", "z_grey"]
    item = ds[0]
    written = np.asarray(Image.open(root / "labeled" / "images" / "l_00.png"))
    assert item["image"].dtype == np.uint8 and item["image"].shape == (6, 7, 3)
    np.testing.assert_array_equal(item["image"], written)
    np.testing.assert_array_equal(item["mask"], np.asarray(Image.open(root / "labeled" / "masks" / "l_00.png")))
    assert item["mask"].dtype == np.uint8 and item["name"] == "l_00"
    last = ds[3]
    assert last["image"].shape == (6, 7, 3)
    assert np.abs(last["image"].astype(int) - 128).max() <= 2  # JPEG of a constant grey
    np.testing.assert_array_equal(last["mask"], mask)  # 255 (ignore) is allowed


def test_unlabeled_never_looks_for_masks(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree(n_unlabeled=4)
    assert not (root / "unlabeled" / "masks").exists()
    ds = FolderDataset(root, "unlabeled", num_classes=3)
    assert len(ds) == 4 and set(ds[1]) == {"image", "name"}


def test_transform_receives_image_and_mask(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree()
    seen = []

    def transform(image: np.ndarray, mask: np.ndarray | None) -> dict:
        seen.append(mask is None)
        return {"image": image.shape}

    assert FolderDataset(root, "val", 3, transform)[0] == {"image": (16, 20, 3), "name": "v_00"}
    assert FolderDataset(root, "unlabeled", 3, transform)[0]["name"] == "u_00"
    assert seen == [False, True]


def test_missing_root_names_path_and_layout(tmp_path: Path) -> None:
    message = _error(lambda: FolderDataset(tmp_path / "nowhere", "labeled", 3))
    assert str(tmp_path / "nowhere") in message
    for folder in ("labeled/images", "labeled/masks", "unlabeled/images", "val/images", "val/masks"):
        assert folder in message


@pytest.mark.parametrize(("subset", "removed"), [
    ("labeled", "labeled/images"), ("labeled", "labeled/masks"), ("unlabeled", "unlabeled/images"),
    ("val", "val/images"), ("val", "val/masks"),
])
def test_missing_subfolder_is_named(folder_tree: Callable[..., Path], subset: str, removed: str) -> None:
    root = folder_tree()
    shutil.rmtree(root / removed)
    assert str(root / removed) in _error(lambda: FolderDataset(root, subset, 3))


def test_empty_image_folder_is_named_unless_allowed(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree(n_unlabeled=0, n_val=0)
    assert str(root / "val" / "images") in _error(lambda: FolderDataset(root, "val", 3))
    assert str(root / "unlabeled" / "images") in _error(lambda: FolderDataset(root, "unlabeled", 3))
    assert len(FolderDataset(root, "unlabeled", 3, allow_empty=True)) == 0


def test_empty_mask_folder_is_named(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree()
    for p in (root / "labeled" / "masks").iterdir():
        p.unlink()
    assert str(root / "labeled" / "masks") in _error(lambda: FolderDataset(root, "labeled", 3))


def test_image_without_mask_names_image_and_expected_mask(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree()
    (root / "val" / "masks" / "v_01.png").unlink()
    message = _error(lambda: FolderDataset(root, "val", 3))
    assert str(root / "val" / "images" / "v_01.png") in message
    assert str(root / "val" / "masks" / "v_01.png") in message


def test_bad_mask_values_name_file_and_values_when_loaded(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree(num_classes=3)
    bad = np.zeros((16, 20), np.uint8)
    bad[0, 0], bad[1, 1], bad[2, 2] = 7, 3, 255  # 7 and 3 are out of [0, 3); 255 is ignore
    Image.fromarray(bad).save(root / "labeled" / "masks" / "l_01.png")
    ds = FolderDataset(root, "labeled", num_classes=3)  # the constructor does not read masks
    ds[0]
    message = _error(lambda: ds[1])
    assert str(root / "labeled" / "masks" / "l_01.png") in message
    assert "values [3, 7] outside [0, 3)" in message  # 255 is not reported


def test_mask_of_another_size_is_an_error(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "val" / "masks" / "v_00.png")
    message = _error(lambda: FolderDataset(root, "val", 3)[0])
    assert str(root / "val" / "masks" / "v_00.png") in message and "5x5" in message


def test_rgb_mask_is_an_error(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree()
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(root / "val" / "masks" / "v_00.png")
    message = _error(lambda: FolderDataset(root, "val", 3)[0])
    assert str(root / "val" / "masks" / "v_00.png") in message and "RGB" in message


def test_unknown_subset(folder_tree: Callable[..., Path]) -> None:
    assert "'train'" in _error(lambda: FolderDataset(folder_tree(), "train", 3))
