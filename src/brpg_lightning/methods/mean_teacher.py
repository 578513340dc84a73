"""Mean teacher with pseudo-labels: the paper's pretraining stage (Sec. 3.3, U2PL recipe, Sec. 4.1.5)."""

from __future__ import annotations

from typing import Any

import torch

from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.base import SegmentationModule
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.methods.cutmix import apply_cutmix
from brpg_lightning.methods.ema import EMATeacher
from brpg_lightning.methods.pseudo_label import drop_percent_schedule, masked_cross_entropy, unsup_filter_mask
from brpg_lightning.models.output import SegmentorOutput, as_probabilities

TEACHER_FORWARDS = ("student_batch", "weak_only")
"""``method.teacher_forward`` options (see :class:`MeanTeacher`)."""

LU_NORMS = ("paper", "official")
"""``method.lu_norm`` options: Eq. (6)'s ``1 / M``, or the official ``B H W / M^2``."""


class MeanTeacher(SegmentationModule):
    """L = L_s + lambda_u L_u (Eq. 7); the teacher is an EMA of the student.

    The first ``sup_only_epochs`` epochs train the student on labeled data only; at the first step after
    them the teacher's parameters become an exact copy of the student's, then follow them with decay
    ``min(1 - 1/(t+1), ema_decay)`` (``ema_ramp``; t = updates since the copy) or a fixed ``ema_decay``.
    Pseudo-labels and their confidences (Eq. 3) come from the eval-mode teacher on the weak view; the
    student sees the strong view (colour jitter, then CutMix with probability ``cutmix_p`` applied alike to
    images, pseudo-labels and confidences).

    The paper is silent on the teacher's BatchNorm statistics and on which prediction the L_u filter reads;
    ``teacher_forward`` chooses:

    - ``student_batch`` (default; the official code, U2PL ``train_semi.py``): the EMA covers parameters only
      and the copy takes parameters only. The teacher keeps its own BN running statistics, gathered by a
      train-mode forward (no grad) on exactly the student's batch each step: the labeled images during the
      supervised-only epochs, then labeled + CutMix'd strong views. L_u's filter (entropy percentile, Eq. 4
      or Eq. 5) reads that train-mode prediction on the student's unlabeled input. One more teacher forward
      per step, in the warm-up too.
    - ``weak_only``: timm ``ModelEmaV3``-style: the copy and the EMA cover the BN buffers too (the student
      gathers them on labeled + strong views), the teacher only runs in eval mode on the weak view, and the
      filter reads those weak-view probabilities, CutMix'd with the pseudo-labels.

    Args:
        ema_decay, ema_ramp, sup_only_epochs: teacher schedule (U2PL: 0.99, ramp, 1).
        lambda_u: weight of L_u (Eq. 7).
        unsup_filter: ``confidence`` (Eq. 4, ``eta``), ``entropy`` (Eq. 5, ``beta``) or ``entropy_percentile``
            (the paper's setting: drop the p_t % highest-entropy pixels, p_t from ``drop_percent_start`` at
            epoch 0 linearly to 0 at the last epoch).
        cutmix_p: probability of CutMix per batch.
        teacher_forward: ``student_batch`` | ``weak_only``, above.
        lu_norm: ``paper`` (Eq. 6: the kept pixels' cross-entropy divided by their number M) or ``official``
            (U2PL ``compute_unsupervised_loss``: that mean times ``B H W / M``).
        label_padding: give pseudo-labels to the unlabeled crop's padded pixels too (the official code
            does); default False: padded pixels are not image content, so they carry no pseudo-label.
        **kwargs: :class:`SegmentationModule` arguments.
    """

    default_sup_only_epochs = 1

    def __init__(
        self,
        *args: Any,
        ema_decay: float = 0.99,
        ema_ramp: bool = True,
        lambda_u: float = 1.0,
        unsup_filter: str = "entropy_percentile",
        eta: float = 0.95,
        beta: float = 0.5,
        drop_percent_start: float = 20.0,
        cutmix_p: float = 0.5,
        teacher_forward: str = "student_batch",
        lu_norm: str = "paper",
        label_padding: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if teacher_forward not in TEACHER_FORWARDS:
            raise BRPGInputError(
                f"method.teacher_forward={teacher_forward!r}; expected one of {', '.join(TEACHER_FORWARDS)}"
            )
        if lu_norm not in LU_NORMS:
            raise BRPGInputError(f"method.lu_norm={lu_norm!r}; expected one of {', '.join(LU_NORMS)}")
        self.teacher_forward, self.lu_norm, self.label_padding = teacher_forward, lu_norm, bool(label_padding)
        own_stats = teacher_forward == "student_batch"
        self.teacher = EMATeacher(self.student, decay=ema_decay, ramp=ema_ramp, buffers=not own_stats)
        self.register_buffer("teacher_ready", torch.tensor(False))
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

    @property
    def _own_teacher_stats(self) -> bool:
        return self.teacher_forward == "student_batch"

    @torch.no_grad()
    def _teacher_train_forward(self, x: torch.Tensor):  # noqa: ANN202
        """The teacher in train mode on ``x`` (no grad): updates its own BN statistics; back to eval after."""
        self.teacher.train()
        out = self.teacher(x)
        self.teacher.eval()
        return out

    def teacher_probabilities(self, out_t: SegmentorOutput, unlabeled: dict[str, Any], size: tuple[int, int]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, valid)``: the eval-mode teacher's softmax on the weak view at ``size``, and the pixels that
        get a pseudo-label (the diagnostics lab overrides this with the true masks)."""
        valid = torch.ones_like(unlabeled["valid"]) if self.label_padding else unlabeled["valid"]
        return as_probabilities(out_t.logits_at(size)), valid

    def unsup_keep(self, filter_probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The pixels L_u trains on: the method's filter (Eq. 4, Eq. 5 or the entropy percentile) over ``valid``."""
        drop = drop_percent_schedule(self.current_epoch, self.trainer.max_epochs, self.drop_percent_start)
        return unsup_filter_mask(self.unsup_filter, filter_probs, valid, eta=self.eta, beta=self.beta,
                                 drop_percent=drop)

    def warmup_step(self, batch: dict[str, Any]) -> TrainStepContext:
        """Labeled-only step; the official teacher also forwards the labeled images for its BN statistics."""
        if self._own_teacher_stats and not bool(self.teacher_ready):
            self._teacher_train_forward(batch["labeled"]["image"])
        return super().warmup_step(batch)

    def compute_step(self, batch: dict[str, Any]) -> TrainStepContext:
        x_l, y_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        if not bool(self.teacher_ready):
            self.teacher.copy_from(self.student, buffers=not self._own_teacher_stats)
            self.teacher_ready.fill_(True)

        unlabeled = batch["unlabeled"]
        size = tuple(y_l.shape[-2:])
        with torch.no_grad():
            self.teacher.eval()
            out_t = self.teacher(unlabeled["image"])
            probs, valid = self.teacher_probabilities(out_t, unlabeled, size)
            conf, pseudo = self.pseudo_labels(probs, valid)  # Eq. (3)
            maps = [pseudo, conf, valid] + ([] if self._own_teacher_stats else [probs])
            x_s, pseudo, conf, valid, *rest, boxes = apply_cutmix(unlabeled["image_strong"], *maps, p=self.cutmix_p)
            x_all = torch.cat([x_l, x_s])
            if self._own_teacher_stats:  # the student's exact batch; sets BN statistics, feeds the filter
                out_f = self._teacher_train_forward(x_all).split([x_l.shape[0], x_s.shape[0]])[1]
                filter_probs = as_probabilities(out_f.logits_at(size))
            else:
                filter_probs = rest[0]

        b_l = x_l.shape[0]
        out_l, out_u = self.student(x_all).split([b_l, x_s.shape[0]])
        keep = self.unsup_keep(filter_probs, valid)
        ctx = self.new_context(out_l, y_l)
        ctx.unlabeled_teacher, ctx.unlabeled_student = out_t, out_u
        ctx.pseudo_labels, ctx.pseudo_confidence, ctx.unsup_keep, ctx.cutmix_boxes = pseudo, conf, keep, boxes
        logits_u = out_u.logits_at(size)
        loss_u = masked_cross_entropy(logits_u, pseudo, keep)
        if self.lu_norm == "official":  # U2PL multiplies the mean by B H W / M
            loss_u = loss_u * (keep.numel() / keep.sum().clamp_min(1))
        ctx.add_loss("L_s", self.supervised_loss(out_l, y_l))
        ctx.add_loss("L_u", self.lambda_u * loss_u)
        self.log_train("train/unsup_kept", keep.float().mean(), b_l)
        return ctx

    def after_optimizer_step(self) -> None:
        """EMA update of the teacher after the optimiser step (Sec. 3.3); Lightning calls ``optimizer_step`` once
        per optimiser step, so with gradient accumulation ``t`` counts optimiser steps."""
        if bool(self.teacher_ready):
            decay = self.teacher.update(self.student)
            self.log("train/ema_decay", decay, batch_size=1)
