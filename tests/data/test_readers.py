"""Readers of the real layouts on tiny generated trees: PASCAL (palette and grey masks, classic/blended),
Cityscapes (trainIds and the official labelIds table), COCO (the unlabeled complement), the folder layout's
classes file and name matching, and the published split lists' line formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.data.datamodule import SemiSupervisedDataModule
from brpg_lightning.data.datasets.cityscapes import CITYSCAPES_CLASSES, label_id_lut
from brpg_lightning.data.datasets.coco import COCO_CLASSES
from brpg_lightning.data.datasets.folder import FolderDataset, read_classes_file
from brpg_lightning.data.datasets.pascal import PASCAL_CLASSES
from brpg_lightning.data.splits import LAYOUTS, make_layout
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import EvalProtocol
from tests.data.trees import (
    OFFICIAL_LABELS,
    SHARED_SPLITS,
    cityscapes_tree,
    coco_lines,
    coco_tree,
    pascal_ids,
    pascal_tree,
)


def dm(name: str, root: Path, split: str, **kwargs: Any) -> SemiSupervisedDataModule:
    args: dict[str, Any] = {
        "name": name, "layout": name, "root": str(root), "split_dir": str(root / "splits"), "split": split,
        "num_classes": {"pascal": 21, "cityscapes": 19, "coco": 81}[name], "crop_size": 8,
        "batch_size_labeled": 2, "batch_size_unlabeled": 2,
    }
    args.update(kwargs)
    return SemiSupervisedDataModule(**args)


def test_pascal_classic_palette_and_blended_grey_masks_read_as_class_ids(tmp_path: Path) -> None:
    root, masks = pascal_tree(tmp_path / "voc")
    lab, unl, val = pascal_ids()
    for mask_dir in ("SegmentationClass", "SegmentationClassAug"):
        with Image.open(root / mask_dir / f"{lab[0]}.png") as img:
            assert img.mode == ("P" if mask_dir == "SegmentationClass" else "L")
        d = dm("pascal", root, "92", mask_dir=mask_dir)
        d.setup("fit")
        assert d.class_names == list(PASCAL_CLASSES) and len(d.class_names) == 21
        assert d.class_names[0] == "background" and d.class_names[15] == "person"
        assert len(d.labeled_set) == 3 and len(d.unlabeled_set) == 4 and len(d.val_set) == 2
        item = d.labeled_set.load(0)
        np.testing.assert_array_equal(item[1], masks[d.labeled_set.names[0]])  # indices, 255 kept
        assert item[0].shape == (12, 16, 3) and item[0].dtype == np.uint8
        val_item = d.val_set[0]
        assert val_item["name"] == val[0] and val_item["mask"].dtype == torch.int64
        assert (val_item["mask"] == IGNORE_INDEX).sum() == 3  # boundary pixels stay ignored
        assert d.unlabeled_set.load(0)[1] is None
    assert d.eval_protocol == EvalProtocol("whole", None, None)


def test_official_labelids_table_for_all_34_ids() -> None:
    lut = label_id_lut()
    assert lut.shape == (256,) and lut.dtype == np.uint8
    for name, label_id, train_id in OFFICIAL_LABELS:
        if label_id < 0:
            continue
        expected = IGNORE_INDEX if train_id in (255, -1) else train_id
        assert lut[label_id] == expected, name
        if expected != IGNORE_INDEX:
            assert CITYSCAPES_CLASSES[expected] == name
    assert sum(1 for _, i, _ in OFFICIAL_LABELS if i >= 0) == 34
    assert (lut[34:] == IGNORE_INDEX).all()  # every id outside the table is ignored
    assert sorted(set(lut[:34].tolist()) - {IGNORE_INDEX}) == list(range(19))


def test_cityscapes_trainids_and_labelids_give_the_same_masks(tmp_path: Path) -> None:
    root, raw = cityscapes_tree(tmp_path / "city")
    expected_table = {label_id: (255 if t in (255, -1) else t) for _, label_id, t in OFFICIAL_LABELS if label_id >= 0}
    loaded = {}
    for fmt in ("trainIds", "labelIds"):
        d = dm("cityscapes", root, "372", label_format=fmt, val_mode="sliding", val_crop_size=8)
        d.setup("fit")
        assert d.class_names == list(CITYSCAPES_CLASSES) and len(d.class_names) == 19
        loaded[fmt] = [d.labeled_set.load(i)[1] for i in range(len(d.labeled_set))]
        assert len(d.unlabeled_set) == 4
    first = d.labeled_set.samples[0]
    ids = raw[first.image.relative_to(root).as_posix()]
    np.testing.assert_array_equal(loaded["labelIds"][0], np.vectorize(expected_table.get)(ids).astype(np.uint8))
    for a, b in zip(loaded["trainIds"], loaded["labelIds"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert d.eval_protocol == EvalProtocol("sliding", 8, None)
    assert d.val_set[0]["image"].shape == (3, 12, 16)  # sliding evaluates the whole image


def test_coco_unlabeled_is_every_train_image_not_labeled(tmp_path: Path) -> None:
    root = coco_tree(tmp_path / "coco")
    lab, extra, _ = coco_lines()
    d = dm("coco", root, "1_128")
    d.setup("fit")
    assert d.class_names == list(COCO_CLASSES) and len(COCO_CLASSES) == 81 and d.class_names[1] == "person"
    labeled_stems = {Path(line.split()[0]).stem for line in lab}
    assert set(d.unlabeled_set.names) == set(extra)  # the complement: all train2017 images minus labeled.txt
    assert set(d.labeled_set.names) == labeled_stems
    assert not labeled_stems & set(d.unlabeled_set.names)
    # an explicit unlabeled.txt is used as given
    (root / "splits" / "1_128" / "unlabeled.txt").write_text(
        "".join(f"train2017/{e}.jpg masks/{e}.png\n" for e in extra[:2])
    )
    d2 = dm("coco", root, "1_128")
    d2.setup("fit")
    assert d2.unlabeled_set.names == extra[:2]


def test_unlabeled_items_never_open_a_mask(tmp_path: Path) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    _, unl, _ = pascal_ids()
    for i in unl:
        (root / "SegmentationClassAug" / f"{i}.png").unlink()  # unlabeled ids have no masks at all
    d = dm("pascal", root, "92")
    d.setup("fit")
    batch = next(iter(d.train_dataloader()))[0]
    assert set(batch["unlabeled"]) == {"image", "image_strong", "valid", "name"}
    assert batch["labeled"]["mask"].shape == (2, 8, 8)


def test_folder_classes_file_names_and_palette_masks(tmp_path: Path, folder_tree) -> None:
    root = folder_tree(num_classes=3, size=(4, 5))
    palette = np.array([[0, 0, 0], [200, 10, 10], [10, 200, 10]], np.uint8)
    ids = np.array([[0, 1, 2, 255, 1]] * 4, np.uint8)
    rgb = np.where((ids == 255)[..., None], 255, palette[np.minimum(ids, 2)]).astype(np.uint8)
    Image.fromarray(rgb).save(root / "val" / "masks" / "v_00.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("# name R G B\nbackground 0 0 0\ncat 200 10 10\ndog 10 200 10\n")
    names, pal = read_classes_file(classes)
    assert names == ["background", "cat", "dog"] and pal.tolist() == palette.tolist()
    ds = FolderDataset(root, "val", 3, palette=pal)
    np.testing.assert_array_equal(ds[0]["mask"], ids)  # colours -> ids, white -> 255
    d = SemiSupervisedDataModule("folder", str(root), 3, "folder", classes_file=str(classes), crop_size=4)
    assert d.class_names == ["background", "cat", "dog"]
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(root / "val" / "masks" / "v_00.png")
    with pytest.raises(BRPGInputError, match=r"v_00.png' has 1 colours not in the classes file palette: \(1, 2, 3\)"):
        ds[0]


def test_folder_name_rule_lists_every_unmatched_file(folder_tree) -> None:
    root = folder_tree(n_labeled=4)
    for name in ("l_01", "l_02"):
        (root / "labeled" / "masks" / f"{name}.png").rename(root / "labeled" / "masks" / f"{name}_mask.png")
    with pytest.raises(BRPGInputError) as err:
        FolderDataset(root, "labeled", 3)
    message = str(err.value)
    assert "2 images" in message and "'l_01.png', 'l_02.png'" in message and "\n" not in message
    (root / "labeled" / "images" / "l_01.png").unlink()
    (root / "labeled" / "images" / "l_02.png").unlink()
    with pytest.raises(BRPGInputError, match="2 masks .* no image of the same name.*'l_01_mask.png', 'l_02_mask.png'"):
        FolderDataset(root, "labeled", 3)


@pytest.mark.skipif(not SHARED_SPLITS.is_dir(), reason="published split lists not present")
@pytest.mark.parametrize("dataset", ["pascal", "cityscapes", "coco"])
def test_published_split_lines_parse_in_their_layout(dataset: str, tmp_path: Path) -> None:
    layout = make_layout(dataset, tmp_path)
    for path in sorted((SHARED_SPLITS / dataset).rglob("*.txt")):
        with path.open() as f:
            lines = [next(f).strip() for _ in range(3)]
        for line in lines:
            sample = layout.sample(line)
            assert layout.line(sample) == line  # the format round-trips
            assert sample.image.suffix in (".jpg", ".png") and sample.mask is not None
            assert sample.image.is_relative_to(tmp_path) and sample.mask.is_relative_to(tmp_path)


def test_every_layout_is_registered() -> None:
    assert set(LAYOUTS) == {"pascal", "cityscapes", "coco", "folder"}
