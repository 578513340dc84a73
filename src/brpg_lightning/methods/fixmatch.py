"""FixMatch for segmentation (Sohn et al. 2020; UniMatch's ``fixmatch.py`` recipe): paper Table 10."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.methods.base import SegmentationModule
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.methods.cutmix import apply_cutmix


def fixmatch_loss(logits: Tensor, pseudo: Tensor, conf: Tensor, eta: float) -> Tensor:
    """``sum_ij CE(p_ij, g_ij) [conf_ij >= eta] / #{ij : g_ij != ignore}`` (UniMatch's FixMatch ``loss_u_s``).

    ``logits (B, C, H, W)`` strong view, ``pseudo (B, H, W)`` long (``IGNORE_INDEX`` on padding),
    ``conf (B, H, W)``. The denominator counts every valid pixel, kept or not (UniMatch), unlike Eq. (6).

    Example:
        >>> logits = torch.zeros(1, 2, 1, 2)
        >>> round(fixmatch_loss(logits, torch.tensor([[[1, 0]]]), torch.tensor([[[0.99, 0.5]]]), 0.95).item(), 4)
        0.3466
    """
    ce = F.cross_entropy(logits.float(), pseudo, ignore_index=IGNORE_INDEX, reduction="none")
    valid = pseudo != IGNORE_INDEX
    return (ce * (conf >= eta)).sum() / valid.sum().clamp_min(1)


class FixMatch(SegmentationModule):
    """L = L_s + lambda_u L_u with one network (the student is also evaluated).

    Each step: the student on ``cat(labeled, weak)`` in train mode; the weak half is detached and gives
    the pseudo-labels (Eq. 3) and confidences; the strong view (colour jitter, then CutMix with
    probability ``cutmix_p``, same boxes on pseudo-labels and confidences) is trained on them where the
    confidence is at least ``eta``. BRPG reads the weak-view forward as ``unlabeled_teacher`` (bank
    features, no gradient) and the strong-view forward as ``unlabeled_student``.

    Args:
        lambda_u: weight of L_u. eta: confidence threshold (FixMatch: 0.95).
        cutmix_p: CutMix probability per batch.
        **kwargs: :class:`SegmentationModule` arguments.
    """

    def __init__(
        self, *args: Any, lambda_u: float = 1.0, eta: float = 0.95, cutmix_p: float = 0.5, **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lambda_u, self.eta, self.cutmix_p = lambda_u, eta, cutmix_p

    def compute_step(self, batch: dict[str, Any]) -> TrainStepContext:
        x_l, y_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        u = batch["unlabeled"]
        out_l, out_w = self.student(torch.cat([x_l, u["image"]])).split([x_l.shape[0], u["image"].shape[0]])
        out_w = out_w.detach()
        with torch.no_grad():
            _, conf, pseudo = self.hard_pseudo_labels(out_w, u["valid"])
            x_s, pseudo, conf, _ = apply_cutmix(u["image_strong"], pseudo, conf, p=self.cutmix_p)
        out_s = self.student(x_s)
        ctx = self.new_context(out_l, y_l)
        ctx.unlabeled_teacher, ctx.unlabeled_student = out_w, out_s
        ctx.pseudo_labels, ctx.pseudo_confidence = pseudo, conf
        logits_s = out_s.logits_at(tuple(y_l.shape[-2:]))
        ctx.add_loss("L_s", self.supervised_loss(out_l, y_l))
        ctx.add_loss("L_u", self.lambda_u * fixmatch_loss(logits_s, pseudo, conf, self.eta))
        self.log_train("train/unsup_kept", (conf >= self.eta).float().mean(), x_l.shape[0])
        return ctx
