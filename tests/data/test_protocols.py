"""Evaluation protocols: the datamodule and the module get one value, the module runs it (sliding window = whole
image for a pointwise model, every pixel covered), it is printed at the start of validation; the paper's presets
resolve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import Tensor, nn

from brpg_lightning.constants import IMAGENET_MEAN, IMAGENET_STD
from brpg_lightning.data.datamodule import SemiSupervisedDataModule
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.base import SegmentationModule, scaled_lr
from brpg_lightning.models.inference import EvalProtocol
from brpg_lightning.models.output import SegmentorOutput
from tests.conftest import compose_cfg, optim_node

H, W = 14, 23


class PositionSegmentor(nn.Module):
    """Logits are a fixed function of the pixel position, which the image carries in its R and G channels
    (R = y, G = x); every forward records which positions it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen = torch.zeros(H, W)
        self.calls = 0

    @staticmethod
    def positions(x: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        raw = (x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)) * 255.0
        return raw[:, 0].round(), raw[:, 1].round()

    def forward(self, x: Tensor) -> SegmentorOutput:
        self.calls += 1
        y, xx = self.positions(x)
        self.seen[y[0].long(), xx[0].long()] += 1
        logits = torch.stack([torch.sin(y) + xx / 7, (y * xx) % 3 / 2, -y / 5 + self.w], dim=1)
        return SegmentorOutput(logits, logits, logits, stride=1)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": [self.w], "head": []}


def position_tree(root: Path) -> Path:
    """Folder layout whose one val image encodes its pixel positions; the mask is the argmax of the logits
    of :class:`PositionSegmentor` (so a correct evaluation scores mIoU 1 on present classes)."""
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    image = np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8)
    logits = np.stack([np.sin(yy) + xx / 7, (yy * xx) % 3 / 2, -yy / 5], 0)
    for subset in ("labeled", "val"):
        (root / subset / "images").mkdir(parents=True)
        (root / subset / "masks").mkdir(parents=True)
        Image.fromarray(image).save(root / subset / "images" / "p.png")
        Image.fromarray(logits.argmax(0).astype(np.uint8)).save(root / subset / "masks" / "p.png")
    (root / "unlabeled" / "images").mkdir(parents=True)
    return root


def module(seg: PositionSegmentor, protocol: EvalProtocol | None = None) -> SegmentationModule:
    return SegmentationModule(seg, num_classes=3, optim=optim_node(lr=0.1), eval_protocol=protocol)


def test_sliding_window_equals_whole_image_and_covers_every_pixel(tmp_path: Path) -> None:
    dm = SemiSupervisedDataModule("folder", str(position_tree(tmp_path / "d")), 3, "folder", crop_size=8,
                                  batch_size_labeled=1, val_mode="sliding", val_crop_size=8, val_stride=5)
    dm.setup("validate")
    images = dm.val_set[0]["image"][None]
    seg = PositionSegmentor()
    whole = module(seg).predict_logits(images, (H, W))
    assert seg.calls == 1
    seg.seen.zero_()
    slid = module(seg, dm.eval_protocol).predict_logits(images, (H, W))
    torch.testing.assert_close(slid, whole)
    assert seg.calls == 1 + 3 * 4  # rows [0, 5, 6], cols [0, 5, 10, 15]
    assert bool((seg.seen >= 1).all()) and int(seg.seen.max()) > 1


def test_validation_prints_and_runs_the_datamodules_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = position_tree(tmp_path / "d")
    results = {}
    for mode in ("sliding", "whole"):
        dm = SemiSupervisedDataModule("folder", str(root), 3, "folder", crop_size=8, batch_size_labeled=1,
                                      val_mode=mode, val_crop_size=8 if mode == "sliding" else None)
        seg = PositionSegmentor()
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        results[mode] = trainer.validate(module(seg, dm.eval_protocol), datamodule=dm, verbose=False)[0]["val/mIoU"]
        out = capsys.readouterr().out
        expected = "sliding window 8x8, stride 6 (2/3 of the crop)" if mode == "sliding" else "whole image"
        assert f"evaluation protocol (folder): {expected}" in out
        assert seg.calls == (2 * 4 if mode == "sliding" else 1)  # rows [0, 6], cols [0, 6, 12, 15]
    assert results["sliding"] == pytest.approx(results["whole"]) == pytest.approx(1.0)


def test_validation_refuses_a_datamodule_prepared_for_another_protocol(tmp_path: Path) -> None:
    dm = SemiSupervisedDataModule("folder", str(position_tree(tmp_path / "d")), 3, "folder", crop_size=8,
                                  batch_size_labeled=1, val_mode="center_crop", val_crop_size=8)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(BRPGInputError, match="'center crop 8x8 .*' but the module evaluates 'whole image"):
        trainer.validate(module(PositionSegmentor()), datamodule=dm, verbose=False)


def test_bad_protocol_values() -> None:
    for kwargs, fragment in (({"val_mode": "tiles"}, "dataset.val_mode='tiles'"),
                             ({"val_mode": "sliding"}, "needs dataset.val_crop_size"),
                             ({"val_mode": "sliding", "val_crop_size": 8, "val_stride": 0}, "dataset.val_stride=0")):
        with pytest.raises(BRPGInputError, match=fragment):
            SemiSupervisedDataModule("folder", "/nonexistent", 3, "folder", **kwargs)


# ----------------------------------------------------------------------------- the paper's settings
def resolved(*overrides: str, tmp_path: Path) -> Any:
    cfg = compose_cfg(*overrides, output_dir=tmp_path)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def test_cityscapes_segformer_is_the_papers_setting(tmp_path: Path) -> None:
    cfg = resolved("dataset=cityscapes", "split=372", "model=segformer", tmp_path=tmp_path)
    o, d, b = cfg["optim"], cfg["dataset"], cfg["brpg"]
    f = o["optimizer"]
    assert (f["_target_"], f["lr"], f["lr"] * o["head_lr_mult"], f["betas"], f["weight_decay"]) == (
        "torch.optim.AdamW", 6e-5, pytest.approx(6e-4), [0.9, 0.999], 0.01
    )
    assert (d["batch_size_labeled"], d["batch_size_unlabeled"], cfg["trainer"]["max_epochs"], d["crop_size"]) == (
        8, 8, 200, 769
    )
    assert (b["T_S1"], b["T_S2"], d["split"], d["num_classes"], d["scale_range"]) == (3, 6, 372, 19, [0.5, 2.0])
    assert (d["val_mode"], d["val_crop_size"], d["val_stride"]) == ("sliding", 769, None)
    assert cfg["model"]["arch"] == "segformer" and o["poly_power"] == 0.9 and o["lr_scaling"] == "none"


def test_cityscapes_deeplab_pascal_and_coco_settings(tmp_path: Path) -> None:
    city = resolved("dataset=cityscapes", "model=deeplabv3plus", tmp_path=tmp_path)
    f = city["optim"]["optimizer"]
    assert (f["_target_"], f["lr"], f["momentum"], f["weight_decay"]) == ("torch.optim.SGD", 0.005, 0.9, 5e-4)
    # one lr for backbone and decoder: the paper names no decoder lr here, the official code multiplies by 10
    # only for pascal and coco
    assert city["optim"]["head_lr_mult"] == 1.0
    # L_s is Eq. (2)'s CE on every dataset; the official 0.5 CE + 0.5 OHEM stays an option
    assert city["method"]["sup_loss"]["kind"] == "ce"
    for model in ("deeplabv3plus", "segformer"):  # PASCAL: same setting for both networks
        voc = resolved("dataset=pascal", "split=1464", f"model={model}", tmp_path=tmp_path)
        o, d = voc["optim"], voc["dataset"]
        f = o["optimizer"]
        assert (f["_target_"], f["lr"], f["lr"] * o["head_lr_mult"], f["momentum"], f["weight_decay"]) == (
            "torch.optim.SGD", 0.001, pytest.approx(0.01), 0.9, 1e-4
        )
        assert (d["batch_size_labeled"], d["batch_size_unlabeled"], voc["trainer"]["max_epochs"], d["crop_size"]) == (
            16, 16, 80, 513
        )
        assert (voc["brpg"]["T_S1"], voc["brpg"]["T_S2"], d["val_mode"], d["val_crop_size"]) == (1, 2, "center_crop", 513)
    coco = resolved("dataset=coco", "split=1_64", tmp_path=tmp_path)
    assert (coco["trainer"]["max_epochs"], coco["dataset"]["val_crop_size"], coco["dataset"]["num_classes"]) == (30, 641, 81)
    assert (coco["optim"]["optimizer"]["lr"], coco["dataset"]["crop_size"], coco["brpg"]["T_S2"]) == (0.001, 513, 2)
    assert resolved("dataset=coco", tmp_path=tmp_path)["split"] == "1_32"  # not the YAML integer 132


def test_linear_lr_scaling_with_the_total_batch() -> None:
    # 4 + 4 per device on 2 devices is a total of 8: half the paper's 16, so half the learning rate
    assert scaled_lr(0.001, "linear", per_device_batch=4, world_size=2, reference_batch=16) == pytest.approx(0.0005)
    assert scaled_lr(6e-5, "linear", per_device_batch=8, world_size=1, reference_batch=8) == pytest.approx(6e-5)
    with pytest.raises(BRPGInputError, match="optim.lr_scaling='sqrt'"):
        scaled_lr(0.001, "sqrt", 4, 1, 16)
