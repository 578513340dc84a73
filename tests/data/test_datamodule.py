"""SemiSupervisedDataModule: batch contract, epoch = one unlabeled pass, labeled cycling, SupOnly, errors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.data.datamodule import SemiSupervisedDataModule
from brpg_lightning.errors import BRPGInputError


def _dm(root: Path, **kwargs: Any) -> SemiSupervisedDataModule:
    args: dict[str, Any] = {
        "name": "folder", "root": str(root), "num_classes": 3, "split": "folder", "valid_splits": ["folder"],
        "crop_size": 12, "batch_size_labeled": 2, "batch_size_unlabeled": 4, "batch_size_val": 2,
    }
    args.update(kwargs)
    return SemiSupervisedDataModule(**args)


def _epoch(dm: SemiSupervisedDataModule) -> list[dict[str, Any]]:
    """All batches of one training epoch, iterated like Lightning (``iter`` then ``next``)."""
    loader = dm.train_dataloader()
    iterator = iter(loader)
    assert len(loader) == dm.iterations_per_epoch
    return [batch for batch, _, _ in iterator]


def test_combined_loader_yields_the_batch_contract(folder_tree: Callable[..., Path]) -> None:
    dm = _dm(folder_tree(n_labeled=3, n_unlabeled=10))
    dm.setup("fit")
    batch = _epoch(dm)[0]
    assert set(batch) == {"labeled", "unlabeled"}
    lab, unl = batch["labeled"], batch["unlabeled"]
    assert set(lab) == {"image", "mask", "name"} and set(unl) == {"image", "image_strong", "valid", "name"}
    assert lab["image"].shape == (2, 3, 12, 12) and lab["image"].dtype == torch.float32
    assert lab["mask"].shape == (2, 12, 12) and lab["mask"].dtype == torch.int64
    assert set(lab["mask"].unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    assert unl["image"].shape == unl["image_strong"].shape == (4, 3, 12, 12)
    assert unl["valid"].shape == (4, 12, 12) and unl["valid"].dtype == torch.bool
    assert len(lab["name"]) == 2 and len(unl["name"]) == 4


def test_epoch_is_one_pass_over_unlabeled(folder_tree: Callable[..., Path]) -> None:
    dm = _dm(folder_tree(n_labeled=3, n_unlabeled=10), batch_size_unlabeled=4)
    dm.setup("fit")
    batches = _epoch(dm)
    assert dm.iterations_per_epoch == len(batches) == 10 // 4
    names = [n for b in batches for n in b["unlabeled"]["name"]]
    assert len(names) == 8 and len(set(names)) == 8  # drop_last: no unlabeled image twice in an epoch


def test_labeled_set_cycles_in_full_passes(folder_tree: Callable[..., Path]) -> None:
    dm = _dm(folder_tree(n_labeled=3, n_unlabeled=12), batch_size_labeled=2, batch_size_unlabeled=2)
    dm.setup("fit")
    torch.manual_seed(0)
    batches = _epoch(dm)
    assert len(batches) == 12 // 2
    names = [n for b in batches for n in b["labeled"]["name"]]
    assert len(names) == 6 * 2
    assert Counter(names) == {"l_00": 4, "l_01": 4, "l_02": 4}  # 12 draws = 4 full passes over 3 images
    for start in range(0, 12, 3):  # every pass is a permutation
        assert sorted(names[start : start + 3]) == ["l_00", "l_01", "l_02"]


def test_supervised_baseline_keeps_the_epoch_length(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree(n_labeled=3, n_unlabeled=10)
    semi, sup = _dm(root), _dm(root, use_unlabeled=False)
    semi.setup("fit")
    sup.setup("fit")
    batches = _epoch(sup)
    assert all(set(b) == {"labeled"} for b in batches)
    assert len(batches) == len(_epoch(semi)) == 10 // 4


def test_no_unlabeled_images_gives_one_labeled_pass(folder_tree: Callable[..., Path]) -> None:
    dm = _dm(folder_tree(n_labeled=7, n_unlabeled=0), batch_size_labeled=2)
    dm.setup("fit")
    batches = _epoch(dm)
    assert all(set(b) == {"labeled"} for b in batches)
    assert len(batches) == dm.iterations_per_epoch == 7 // 2
    names = [n for b in batches for n in b["labeled"]["name"]]
    assert len(set(names)) == len(names) == 6


def test_val_and_test_loaders(folder_tree: Callable[..., Path]) -> None:
    dm = _dm(folder_tree(n_val=3, size=(10, 14)), batch_size_val=2)
    dm.setup("validate")
    assert dm.labeled_set is None  # validate builds only the val set
    batches = list(dm.val_dataloader())
    assert [b["name"] for b in batches] == [["v_00", "v_01"], ["v_02"]]
    assert batches[0]["image"].shape == (2, 3, 10, 14) and batches[0]["mask"].shape == (2, 10, 14)
    assert batches[0]["mask"].dtype == torch.int64
    assert [b["name"] for b in dm.test_dataloader()] == [b["name"] for b in batches]


def test_val_images_of_different_sizes_need_batch_size_one(folder_tree: Callable[..., Path]) -> None:
    root = folder_tree(n_val=2)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "val" / "images" / "v_01.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "val" / "masks" / "v_01.png")
    dm = _dm(root, batch_size_val=2)
    dm.setup("validate")
    with pytest.raises(BRPGInputError, match="batch_size_val=1"):
        next(iter(dm.val_dataloader()))
    assert len(list(_dm(root, batch_size_val=1).val_dataloader())) == 2


def test_setup_is_idempotent(folder_tree: Callable[..., Path]) -> None:
    dm = _dm(folder_tree())
    dm.setup("fit")
    sets = (dm.labeled_set, dm.unlabeled_set, dm.val_set)
    dm.setup("fit")
    dm.setup("validate")
    assert (dm.labeled_set, dm.unlabeled_set, dm.val_set) == sets


def test_setup_validates_the_root(tmp_path: Path) -> None:
    dm = _dm(tmp_path / "missing")
    with pytest.raises(BRPGInputError, match="does not exist"):
        dm.setup("fit")


def test_invalid_split_message_lists_valid_splits(tmp_path: Path) -> None:
    with pytest.raises(BRPGInputError) as err:
        _dm(tmp_path, name="synthetic", split=17, valid_splits=[16, 32, "full"])
    assert str(err.value) == "split '17' is not valid for dataset 'synthetic'; valid splits: 16, 32, full"
    assert _dm(tmp_path, name="synthetic", split=16, valid_splits=["16", "32", "full"]).split == "16"


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"class_names": ["a", "b"]}, "class_names"),
    ({"batch_size_unlabeled": 0}, "batch_size_unlabeled"),
    ({"val_mode": "sliding"}, "val_mode"),
    ({"name": "synthetic", "split": "16", "valid_splits": None, "synthetic": {"split": "32"}}, "synthetic.split"),
])
def test_bad_arguments_are_one_line_errors(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    with pytest.raises(BRPGInputError) as err:
        _dm(tmp_path, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_too_few_unlabeled_images_for_a_batch(folder_tree: Callable[..., Path]) -> None:
    dm = _dm(folder_tree(n_unlabeled=3), batch_size_unlabeled=4)
    with pytest.raises(BRPGInputError, match="fewer than batch_size_unlabeled=4"):
        dm.setup("fit")


def test_synthetic_prepare_data_generates_and_names_classes(tmp_path: Path) -> None:
    dm = SemiSupervisedDataModule(
        name="synthetic", root=str(tmp_path / "syn"), num_classes=7, split=16, valid_splits=[16, 32, "full"],
        crop_size=24, batch_size_labeled=4, batch_size_unlabeled=4, batch_size_val=4,
        synthetic={"seed": 0, "image_size": 32, "train_pool": 24, "val_size": 4},
    )
    assert dm.class_names == ["background", "disc", "square", "triangle", "ring", "cross", "bar"]
    assert dm.num_classes == 7 and dm.ignore_index == IGNORE_INDEX == 255
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.labeled_set) == 16 and len(dm.unlabeled_set) == 8
    assert dm.iterations_per_epoch == 8 // 4
    assert next(iter(dm.val_dataloader()))["image"].shape == (4, 3, 32, 32)
    assert _dm(tmp_path).class_names == ["class_0", "class_1", "class_2"]


class _CountingModule(pl.LightningModule):
    """A 1x1 conv trained on labeled masks; records the training batches it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.keys: list[tuple[str, ...]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.keys.append(tuple(sorted(batch)))
        lab = batch["labeled"]
        return nn.functional.cross_entropy(self.conv(lab["image"]), lab["mask"], ignore_index=IGNORE_INDEX)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("use_unlabeled", [True, False])
def test_lightning_trainer_runs_one_unlabeled_pass_per_epoch(
    folder_tree: Callable[..., Path], use_unlabeled: bool
) -> None:
    dm = _dm(folder_tree(n_labeled=3, n_unlabeled=10), use_unlabeled=use_unlabeled, batch_size_unlabeled=3)
    module = _CountingModule()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    expected_keys = ("labeled", "unlabeled") if use_unlabeled else ("labeled",)
    assert module.keys == [expected_keys] * (2 * (10 // 3))
    assert trainer.global_step == 2 * (10 // 3)
