"""mIoU as the methods compute it, against a brute-force confusion-matrix computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.methods.supervised import Supervised
from brpg_lightning.models.output import SegmentorOutput
from tests.conftest import optim_node


class FixedPredictor(nn.Module):
    """Returns pre-set logits at decoder stride 1 (so predictions are exactly what the test chose)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> SegmentorOutput:
        return SegmentorOutput(self.logits, self.logits, self.logits, stride=1)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": [self.w], "head": []}


def _reference_miou(preds: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """Dataset-level IoU from one confusion matrix, classes absent from preds and target excluded."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(preds.ravel(), target.ravel(), strict=True):
        if t != IGNORE_INDEX:
            cm[t, p] += 1
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou


def test_validation_miou_matches_brute_force_over_batches() -> None:
    rng = np.random.default_rng(0)
    num_classes, batches = 5, 3
    all_preds, all_targets = [], []
    module = None
    for _ in range(batches):
        target = rng.integers(0, num_classes - 1, size=(2, 6, 7))  # class 4 never present
        target[rng.random(target.shape) < 0.2] = IGNORE_INDEX
        preds = np.where(rng.random(target.shape) < 0.6, np.clip(target, 0, num_classes - 2), rng.integers(0, 4, target.shape))
        logits = torch.nn.functional.one_hot(torch.as_tensor(preds), num_classes).permute(0, 3, 1, 2).float()
        if module is None:
            module = Supervised(FixedPredictor(logits), num_classes, optim=optim_node(lr=0.1))
        module.student.logits = logits
        module.validation_step({"image": torch.zeros(2, 3, 6, 7), "mask": torch.as_tensor(target)}, 0)
        all_preds.append(preds)
        all_targets.append(target)
    ref_miou, ref_iou = _reference_miou(np.concatenate(all_preds), np.concatenate(all_targets), num_classes)
    assert abs(module.val_miou.compute().item() - ref_miou) < 1e-6
    per_class = module.val_iou.compute().numpy()
    present = ~np.isnan(ref_iou)
    np.testing.assert_allclose(per_class[present], ref_iou[present], atol=1e-6)


@pytest.mark.slow
def test_evaluate_report_matches_the_metric_logged_during_validation(tiny_run, tmp_path) -> None:
    """``evaluate`` on the last checkpoint reproduces the run's last ``val/mIoU`` and per-class IoU, and its
    JSON and markdown reports hold the same numbers."""
    import json

    from brpg_lightning.evaluate import run
    from tests.conftest import compose_cfg

    logged = tiny_run["summary"]["metrics"]
    cfg = compose_cfg(f"ckpt_path={tiny_run['last']}", "trainer.accelerator=cpu", f"report_dir={tmp_path}",
                      config_name="evaluate")
    miou = run(cfg)
    assert abs(miou - logged["val/mIoU"]) < 1e-5
    report = json.loads((tmp_path / "last.eval.json").read_text())
    assert abs(report["mIoU"] - logged["val/mIoU"]) < 1e-5
    names = [row["class"] for row in report["per_class"]]
    assert names == ["background", "disc", "square", "triangle", "ring", "cross", "bar"]
    for row in report["per_class"]:
        assert abs(row["IoU"] - logged[f"val/IoU/{row['class']}"]) < 1e-5
    table = (tmp_path / "last.eval.md").read_text().splitlines()
    rows = {ln.split("|")[1].strip(): float(ln.split("|")[2].strip(" *")) for ln in table if ln.startswith("| ")
            and not ln.startswith("| class")}
    assert rows.pop("**mIoU**") == round(logged["val/mIoU"], 4)
    assert rows == {n: round(logged[f"val/IoU/{n}"], 4) for n in names}


@pytest.mark.slow
def test_evaluate_dataset_overrides_change_the_protocol(tiny_run, tmp_path) -> None:
    """``dataset.val_mode=center_crop dataset.val_crop_size=32`` evaluates 32 px centre crops: same mIoU as a
    brute-force confusion matrix over the centre crops of the val images."""
    import json

    from PIL import Image

    from brpg_lightning.evaluate import run
    from tests.app.test_predict import normalised, reference_module
    from tests.conftest import compose_cfg

    cfg = compose_cfg(f"ckpt_path={tiny_run['last']}", "trainer.accelerator=cpu", f"report_dir={tmp_path}",
                      "dataset.val_mode=center_crop", "dataset.val_crop_size=32", config_name="evaluate")
    miou = run(cfg)
    report = json.loads((tmp_path / "last.eval.json").read_text())
    assert report["dataset"]["val_mode"] == "center_crop"
    module = reference_module(tiny_run["last"])
    val = tiny_run["data_root"] / "val"
    preds, targets = [], []
    for path in sorted((val / "images").iterdir()):
        image = np.asarray(Image.open(path).convert("RGB"))
        mask = np.asarray(Image.open(val / "masks" / (path.stem + ".png")))
        y0, x0 = (image.shape[0] - 32) // 2, (image.shape[1] - 32) // 2
        crop = image[y0 : y0 + 32, x0 : x0 + 32]
        with torch.no_grad():
            preds.append(module.predict_logits(normalised(crop), (32, 32)).argmax(1)[0].numpy())
        targets.append(mask[y0 : y0 + 32, x0 : x0 + 32])
    ref, _ = _reference_miou(np.stack(preds), np.stack(targets).astype(np.int64), 7)
    assert abs(miou - ref) < 1e-5
