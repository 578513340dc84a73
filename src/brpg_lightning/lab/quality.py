"""Pseudo-label quality against the true masks, and the student's validation mIoU (diagnostic callbacks)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.methods.cutmix import mix_like


def quality_summary(all_: Tensor, kept: Tensor, class_names: list[str]) -> dict[str, float]:
    """Scalars of two confusion matrices ``[true, pseudo]`` over every valid pixel (``all_``) and the kept ones.

    ``kept`` (share of valid pixels kept), ``acc_kept`` / ``acc_all`` (pixel accuracy of the kept / all
    pseudo-labels), and per class ``kept/<name>`` (share of the class's true pixels kept),
    ``acc_kept_true/<name>`` (kept pixels truly ``<name>`` whose pseudo-label is right) and
    ``acc_kept/<name>`` (precision: kept pixels labeled ``<name>`` that are ``<name>``; NaN if none).

    Example:
        >>> all_ = torch.tensor([[2, 0], [0, 2]]); kept = torch.tensor([[1, 0], [0, 2]])
        >>> s = quality_summary(all_, kept, ["a", "b"]); s["kept"], s["acc_kept"], s["kept/a"]
        (0.75, 1.0, 0.5)
    """
    all_, kept = all_.double(), kept.double()
    n_all, n_kept = all_.sum().clamp_min(1), kept.sum().clamp_min(1)
    out = {
        "kept": float(kept.sum() / n_all),
        "acc_kept": float(kept.diag().sum() / n_kept),
        "acc_all": float(all_.diag().sum() / n_all),
    }
    nan = float("nan")
    for i, name in enumerate(class_names):
        out[f"kept/{name}"] = float(kept[i].sum() / all_[i].sum()) if all_[i].sum() > 0 else nan
        out[f"acc_kept_true/{name}"] = float(kept[i, i] / kept[i].sum()) if kept[i].sum() > 0 else nan
        out[f"acc_kept/{name}"] = float(kept[i, i] / kept[:, i].sum()) if kept[:, i].sum() > 0 else nan
    return out


class PseudoLabelQuality(pl.Callback):
    """The direct measure of confirmation bias, logged as ``pl/*`` at every training epoch end.

    Reads the step's pseudo-labels and L_u keep-mask through the step seam (``ctx.pseudo_labels``,
    ``ctx.unsup_keep``) and the batch's hidden true masks (``dataset.oracle_mask_dir``), CutMix'd with the
    step's boxes (``ctx.cutmix_boxes``). Two torchmetrics confusion matrices (all valid pixels, kept pixels),
    so the counts are summed over DDP ranks before the summary.
    """

    def __init__(self, network: str = "student") -> None:
        self.network = network
        self._true: Tensor | None = None
        self.conf_all: MulticlassConfusionMatrix | None = None
        self.conf_kept: MulticlassConfusionMatrix | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        kwargs = {"num_classes": int(pl_module.num_classes), "ignore_index": IGNORE_INDEX}
        self.conf_all = MulticlassConfusionMatrix(**kwargs).to(pl_module.device)
        self.conf_kept = MulticlassConfusionMatrix(**kwargs).to(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._true = (batch.get("unlabeled") or {}).get("mask") if isinstance(batch, dict) else None

    @torch.no_grad()
    def on_train_step_context(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                              ctx: TrainStepContext) -> None:
        if ctx.network != self.network or self._true is None or ctx.pseudo_labels is None or ctx.unsup_keep is None:
            return
        true = self._true if ctx.cutmix_boxes is None else mix_like(self._true, ctx.cutmix_boxes)
        pseudo = ctx.pseudo_labels
        ok = (pseudo != IGNORE_INDEX) & (true != IGNORE_INDEX)
        self.conf_all.to(pseudo.device).update(pseudo[ok], true[ok])
        kept = ok & ctx.unsup_keep
        self.conf_kept.to(pseudo.device).update(pseudo[kept], true[kept])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.conf_all is None or not self.conf_all.update_called:
            return
        # torchmetrics' matrix is [target, prediction]: rows are the true classes, as the summary expects
        summary = quality_summary(self.conf_all.compute().cpu(), self.conf_kept.compute().cpu(),
                                  list(pl_module.class_names))
        for key, value in summary.items():
            pl_module.log(f"pl/{key}", value, batch_size=1)
        self.conf_all.reset()
        self.conf_kept.reset()


class StudentValidation(pl.Callback):
    """``val/student/mIoU``: the student evaluated beside the method's evaluated network (the teacher)."""

    def __init__(self) -> None:
        self.miou: MulticlassJaccardIndex | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.miou = MulticlassJaccardIndex(int(pl_module.num_classes), ignore_index=IGNORE_INDEX,
                                           average="macro").to(pl_module.device)

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        masks = batch["mask"]
        out = pl_module.student(batch["image"])
        preds = out.logits_at(tuple(masks.shape[-2:])).argmax(1)
        self.miou.to(masks.device).update(preds, masks)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.miou is not None and self.miou.update_called:
            pl_module.log("val/student/mIoU", self.miou.compute())
            self.miou.reset()
