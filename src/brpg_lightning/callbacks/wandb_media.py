"""W&B dashboards beyond scalars: a per-class IoU table and validation images with masks.

Scalars (losses, learning rates, ``brpg/eta_t``, mIoU, per-class IoU, BRPG statistics) reach W&B through
``pl_module.log`` like any logger; the resolved run configuration through the module's hyperparameters
(``run_config``); the best checkpoint as an artifact through ``WandbLogger(log_model=...)``. This callback
adds what ``self.log`` cannot carry. Without a ``WandbLogger`` it does nothing.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from brpg_lightning.constants import IGNORE_INDEX


def wandb_logger(trainer: pl.Trainer) -> WandbLogger | None:
    """The trainer's ``WandbLogger``, or None."""
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class WandbDashboards(pl.Callback):
    """Per validation: ``val/IoU_table`` (class, IoU) and ``val/examples`` (input with ground-truth and
    evaluated-model (teacher) prediction masks) for the first ``num_images`` validation images.

    Args:
        num_images: validation images shown per epoch (0: none).
    """

    def __init__(self, num_images: int = 4) -> None:
        self.num_images = int(num_images)
        self._examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._examples = []

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if wandb_logger(trainer) is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        room = self.num_images - len(self._examples)
        if room <= 0:
            return
        images, masks = batch["image"][:room], batch["mask"][:room]
        preds = pl_module.predict_logits(images, tuple(masks.shape[-2:])).argmax(1)
        for i in range(images.shape[0]):
            self._examples.append((images[i].float().cpu(), masks[i].cpu(), preds[i].cpu()))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = wandb_logger(trainer)
        if logger is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        import wandb

        names = list(getattr(pl_module, "class_names", []))
        rows = []
        for name in names:
            value = trainer.callback_metrics.get(f"val/IoU/{name}")
            if value is not None:
                rows.append([name, float(value)])
        payload: dict[str, Any] = {}
        if rows:
            payload["val/IoU_table"] = wandb.Table(columns=["class", "IoU"], data=rows)
        if self._examples:
            labels = {i: n for i, n in enumerate(names)} | {IGNORE_INDEX: "ignore"}
            payload["val/examples"] = [
                wandb.Image(
                    _to_uint8(img),
                    masks={
                        "ground_truth": {"mask_data": gt.numpy().astype("uint8"), "class_labels": labels},
                        "prediction": {"mask_data": pred.numpy().astype("uint8"), "class_labels": labels},
                    },
                    caption=f"epoch {trainer.current_epoch}",
                )
                for img, gt, pred in self._examples
            ]
        if payload:
            logger.log_metrics(payload, step=trainer.global_step)
        self._examples = []


def _to_uint8(image: torch.Tensor):  # noqa: ANN202
    """``(3, H, W)`` normalised float -> ``(H, W, 3)`` uint8, min-max stretched per image for display."""
    x = image - image.amin()
    x = x / x.amax().clamp_min(1e-8)
    return (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
