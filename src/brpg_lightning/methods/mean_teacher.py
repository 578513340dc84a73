"""Mean teacher with pseudo-labels: the paper's pretraining stage (Sec. 3.3, U2PL recipe, Sec. 4.1.5)."""

from __future__ import annotations

from typing import Any

import torch

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.methods.base import SegmentationModule
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.methods.cutmix import apply_cutmix
from brpg_lightning.methods.ema import EMATeacher
from brpg_lightning.methods.pseudo_label import (
    drop_percent_schedule,
    masked_cross_entropy,
    unsup_filter_mask,
)
from brpg_lightning.models.output import as_probabilities, resize_to_input


class MeanTeacher(SegmentationModule):
    """L = L_s + lambda_u L_u (Eq. 7); the teacher is an EMA of the student.

    The first ``sup_only_epochs`` epochs train the student on labeled data only; at the first step after
    them the teacher becomes an exact copy of the student, then follows it with decay
    ``min(1 - 1/(t+1), ema_decay)`` (``ema_ramp``; t = updates since the copy) or a fixed ``ema_decay``.
    Pseudo-labels (Eq. 3) come from the teacher on the weak view; the student sees the strong view (colour
    jitter, then CutMix with probability ``cutmix_p`` applied alike to images, pseudo-labels and confidences).

    Args:
        ema_decay, ema_ramp, sup_only_epochs: teacher schedule (U2PL: 0.99, ramp, 1).
        lambda_u: weight of L_u (Eq. 7).
        unsup_filter: ``confidence`` (Eq. 4, ``eta``), ``entropy`` (Eq. 5, ``beta``) or ``entropy_percentile``
            (the paper's setting: drop the p_t % highest-entropy pixels, p_t from ``drop_percent_start`` at
            epoch 0 linearly to 0 at the last epoch).
        cutmix_p: probability of CutMix per batch.
        **kwargs: :class:`SegmentationModule` arguments.
    """

    def __init__(
        self,
        *args: Any,
        ema_decay: float = 0.99,
        ema_ramp: bool = True,
        sup_only_epochs: int = 1,
        lambda_u: float = 1.0,
        unsup_filter: str = "entropy_percentile",
        eta: float = 0.95,
        beta: float = 0.5,
        drop_percent_start: float = 20.0,
        cutmix_p: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = EMATeacher(self.student, decay=ema_decay, ramp=ema_ramp)
        self.register_buffer("teacher_ready", torch.tensor(False))
        self.sup_only_epochs = sup_only_epochs
        self.lambda_u = lambda_u
        self.unsup_filter = unsup_filter
        self.eta, self.beta, self.drop_percent_start = eta, beta, drop_percent_start
        self.cutmix_p = cutmix_p
        unsup_filter_mask(unsup_filter, torch.ones(1, 2, 1, 1) / 2, torch.ones(1, 1, 1, dtype=torch.bool),
                          eta=eta, beta=beta, drop_percent=0.0)  # fails early on an unknown filter name

    @property
    def eval_model(self) -> torch.nn.Module:
        """The teacher once it exists (after the supervised-only epochs), else the student."""
        return self.teacher.module if bool(self.teacher_ready) else self.student

    def compute_step(self, batch: dict[str, Any]) -> TrainStepContext:
        labeled = batch["labeled"]
        x_l, y_l = labeled["image"], labeled["mask"]
        if self.current_epoch < self.sup_only_epochs or "unlabeled" not in batch:
            out_l = self.student(x_l)
            ctx = self.new_context(out_l, y_l)
            ctx.add_loss("L_s", self.supervised_loss(out_l, y_l))
            return ctx

        if not bool(self.teacher_ready):
            self.teacher.copy_from(self.student)
            self.teacher_ready.fill_(True)

        unlabeled = batch["unlabeled"]
        size = tuple(y_l.shape[-2:])
        with torch.no_grad():
            self.teacher.eval()
            out_t = self.teacher(unlabeled["image"])
            probs = as_probabilities(resize_to_input(out_t.logits, size, out_t.stride))
            conf, pseudo = probs.max(dim=1)  # Eq. (3)
            valid = unlabeled["valid"]
            pseudo = pseudo.masked_fill(~valid, IGNORE_INDEX)
            conf = conf.masked_fill(~valid, 0.0)
            x_s, pseudo, conf, valid, probs, _ = apply_cutmix(
                unlabeled["image_strong"], pseudo, conf, valid, probs, p=self.cutmix_p
            )

        b_l = x_l.shape[0]
        out_l, out_u = self.student(torch.cat([x_l, x_s])).split([b_l, x_s.shape[0]])
        ctx = self.new_context(out_l, y_l)
        ctx.unlabeled_teacher, ctx.unlabeled_student = out_t, out_u
        ctx.pseudo_labels, ctx.pseudo_confidence = pseudo, conf

        drop = drop_percent_schedule(self.current_epoch, self.trainer.max_epochs, self.drop_percent_start)
        keep = unsup_filter_mask(
            self.unsup_filter, probs, valid, eta=self.eta, beta=self.beta, drop_percent=drop
        )
        logits_u = resize_to_input(out_u.logits, size, out_u.stride)
        ctx.add_loss("L_s", self.supervised_loss(out_l, y_l))
        ctx.add_loss("L_u", self.lambda_u * masked_cross_entropy(logits_u, pseudo, keep))
        self.log("train/unsup_kept", keep.float().mean(), batch_size=b_l)
        return ctx

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EMA update of the teacher after the optimiser step (Sec. 3.3)."""
        if bool(self.teacher_ready):
            decay = self.teacher.update(self.student)
            self.log("train/ema_decay", decay, batch_size=1)
