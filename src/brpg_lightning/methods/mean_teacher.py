"""Mean teacher with pseudo-labels: the paper's pretraining stage (Sec. 3.3, U2PL recipe, Sec. 4.1.5)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.classification import MulticlassJaccardIndex

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.base import SegmentationModule
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.methods.cutmix import apply_cutmix
from brpg_lightning.methods.ema import EMATeacher
from brpg_lightning.methods.pseudo_label import (
    PseudoLabelQuality,
    drop_percent_schedule,
    masked_cross_entropy,
    unsup_filter_mask,
)
from brpg_lightning.models.output import as_probabilities, resize_to_input

TEACHER_BN = ("ema", "own", "weak")
"""``method.teacher_bn`` options (see :class:`MeanTeacher`)."""


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
        teacher_bn: the teacher's BatchNorm running statistics. ``own`` (the official code,
            U2PL ``train_semi.py``; the paper is silent): parameters-only EMA, the teacher's statistics follow
            its own train-mode forward (no grad) on the labeled images + the CutMix'd weak views each step
            (one extra teacher forward per step). ``ema`` (default; as good as ``own`` on the embedded benchmark, README): an EMA of the student's, with the parameters
            (timm ``ModelEmaV3``; the student gathers them on labeled + STRONG views). ``weak``:
            parameters-only EMA; statistics from the teacher's train-mode forward on the weak views alone.
        pl_oracle: DIAGNOSTIC ONLY (off by default): replace the teacher's pseudo-labels by the unlabeled
            images' true masks (``dataset.oracle_mask_dir``), confidence 1, every valid pixel kept.
        val_student: also evaluate the student each validation (``val/student/mIoU``; diagnostics).
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
        teacher_bn: str = "ema",
        pl_oracle: bool = False,
        val_student: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if teacher_bn not in TEACHER_BN:
            raise BRPGInputError(f"method.teacher_bn={teacher_bn!r}; expected one of {', '.join(TEACHER_BN)}")
        self.teacher_bn, self.pl_oracle, self.val_student = teacher_bn, bool(pl_oracle), bool(val_student)
        self.teacher = EMATeacher(self.student, decay=ema_decay, ramp=ema_ramp, buffers=teacher_bn == "ema")
        self.pl_quality = PseudoLabelQuality(self.num_classes)
        if self.val_student:
            self.val_miou_student = MulticlassJaccardIndex(num_classes=self.num_classes,
                                                           ignore_index=IGNORE_INDEX, average="macro")
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
        true_u = unlabeled.get("mask")  # present only in diagnostic runs (dataset.oracle_mask_dir)
        if self.pl_oracle and true_u is None:
            raise BRPGInputError("method.pl_oracle=true needs the hidden true masks: set dataset.oracle_mask_dir")
        size = tuple(y_l.shape[-2:])
        with torch.no_grad():
            self.teacher.eval()
            out_t = self.teacher(unlabeled["image"])
            probs = as_probabilities(resize_to_input(out_t.logits, size, out_t.stride))
            valid = unlabeled["valid"]
            if self.pl_oracle:  # diagnostic: the true masks stand in for the teacher's pseudo-labels
                valid = valid & (true_u != IGNORE_INDEX)
                pseudo = true_u.masked_fill(~valid, 0)
                probs = torch.nn.functional.one_hot(pseudo, self.num_classes).permute(0, 3, 1, 2).to(probs.dtype)
            conf, pseudo = probs.max(dim=1)  # Eq. (3)
            pseudo = pseudo.masked_fill(~valid, IGNORE_INDEX)
            conf = conf.masked_fill(~valid, 0.0)
            maps = [pseudo, conf, valid, probs] + ([true_u] if true_u is not None else [])
            if self.teacher_bn == "own":
                maps.append(unlabeled["image"])
            x_s, pseudo, conf, valid, probs, *rest = apply_cutmix(unlabeled["image_strong"], *maps, p=self.cutmix_p)
            true_mix = rest.pop(0) if true_u is not None else None
            if self.teacher_bn != "ema":  # the teacher's own BN statistics (train-mode forward, no grad)
                self.teacher.train()
                self.teacher(torch.cat([x_l, rest[0]]) if self.teacher_bn == "own" else unlabeled["image"])
                self.teacher.eval()

        b_l = x_l.shape[0]
        out_l, out_u = self.student(torch.cat([x_l, x_s])).split([b_l, x_s.shape[0]])
        ctx = self.new_context(out_l, y_l)
        ctx.unlabeled_teacher, ctx.unlabeled_student = out_t, out_u
        ctx.pseudo_labels, ctx.pseudo_confidence = pseudo, conf

        if self.pl_oracle:
            keep = valid.clone()
        else:
            drop = drop_percent_schedule(self.current_epoch, self.trainer.max_epochs, self.drop_percent_start)
            keep = unsup_filter_mask(
                self.unsup_filter, probs, valid, eta=self.eta, beta=self.beta, drop_percent=drop
            )
        if true_mix is not None:
            self.pl_quality.update(pseudo, keep, valid, true_mix)
        logits_u = resize_to_input(out_u.logits, size, out_u.stride)
        ctx.add_loss("L_s", self.supervised_loss(out_l, y_l))
        ctx.add_loss("L_u", self.lambda_u * masked_cross_entropy(logits_u, pseudo, keep))
        self.log("train/unsup_kept", keep.float().mean(), batch_size=b_l)
        return ctx

    def on_train_epoch_end(self) -> None:
        """Diagnostic runs only: the epoch's pseudo-label quality against the hidden true masks."""
        if self.pl_quality.has_data():
            for key, value in self.pl_quality.summary(self.class_names).items():
                self.log(f"pl/{key}", value)
            self.pl_quality.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.val_student:
            masks = batch["mask"]
            out = self.student(batch["image"])
            preds = resize_to_input(out.logits, tuple(masks.shape[-2:]), out.stride).argmax(1)
            self.val_miou_student.update(preds, masks)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.val_student:
            self.log("val/student/mIoU", self.val_miou_student.compute())
            self.val_miou_student.reset()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EMA update of the teacher after the optimiser step (Sec. 3.3)."""
        if bool(self.teacher_ready):
            decay = self.teacher.update(self.student)
            self.log("train/ema_decay", decay, batch_size=1)
