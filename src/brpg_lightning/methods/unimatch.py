"""UniMatch V1 (Yang et al., CVPR 2023, "Revisiting Weak-to-Strong Consistency"): FixMatch on two strong views
plus a feature-perturbation stream; the official ``unimatch.py`` recipe."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.base import SegmentationModule
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.methods.cutmix import apply_cutmix
from brpg_lightning.methods.fixmatch import fixmatch_loss
from brpg_lightning.models.output import SegmentorOutput


def feature_dropout(p: float) -> Callable[[list[Tensor]], list[Tensor]]:
    """The ``Segmentor(perturb=...)`` of UniMatch's feature-perturbation stream: each encoder map ``f`` becomes
    ``cat(f, Dropout2d(p)(f))`` along the batch, so the decoder runs once on the clean and the dropped copies
    (the official ``DeepLabV3Plus.forward(need_fp=True)``: BatchNorm statistics over both halves). Dropout2d
    zeroes whole channels per sample with probability ``p`` and scales the kept ones by ``1 / (1 - p)``.

    The official code drops the two maps its decoder reads (low-level ``c1`` and ``c4``); here every map the
    encoder returns is dropped, which is the same for the decoder (maps it does not read change nothing).
    """

    def perturb(feats: list[Tensor]) -> list[Tensor]:
        return [torch.cat([f, F.dropout2d(f, p, training=True)]) for f in feats]

    return perturb


def second_strong_view(unlabeled: dict[str, Any]) -> Tensor:
    """``unlabeled["image_strong2"]``, which the datamodule draws for a method with ``strong_views = 2``; a
    batch without it (a datamodule built by hand) stops with one line instead of a ``KeyError``."""
    if "image_strong2" not in unlabeled:
        raise BRPGInputError(
            "UniMatch needs two strong views per unlabeled image: build the datamodule with strong_views=2 "
            "(train.build_datamodule does so from the method's strong_views)"
        )
    return unlabeled["image_strong2"]


class StrongViews:
    """The two strong views of UniMatch (V1 and V2) and what both train on them.

    Each view is CutMix'd with its own boxes together with the weak view's pseudo-labels and confidences; both
    are trained on them by FixMatch's loss (``fixmatch_loss``, threshold ``eta``). BRPG reads the first view
    (:meth:`fill`). ``kept`` is the official ``mask_ratio``: the weak view's valid pixels above ``eta``.
    """

    def __init__(self, unlabeled: dict[str, Any], pseudo: Tensor, conf: Tensor, cutmix_p: float) -> None:
        self.valid, self.conf = unlabeled["valid"], conf
        self.x1, self.pseudo1, self.conf1, self.boxes1 = apply_cutmix(unlabeled["image_strong"], pseudo, conf,
                                                                      p=cutmix_p)
        self.x2, self.pseudo2, self.conf2, _ = apply_cutmix(second_strong_view(unlabeled), pseudo, conf,
                                                            p=cutmix_p)

    def images(self) -> Tensor:
        """``cat(view 1, view 2)``: one student forward for both."""
        return torch.cat([self.x1, self.x2])

    def loss(self, out1: SegmentorOutput, out2: SegmentorOutput, size: tuple[int, int], eta: float) -> Tensor:
        """``L(view 1) + L(view 2)``, each FixMatch's loss at the label ``size``."""
        return (fixmatch_loss(out1.logits_at(size), self.pseudo1, self.conf1, eta)
                + fixmatch_loss(out2.logits_at(size), self.pseudo2, self.conf2, eta))

    def fill(self, ctx: TrainStepContext, out_teacher: SegmentorOutput, out1: SegmentorOutput, eta: float) -> None:
        """The step seam: pseudo-labels from ``out_teacher`` (detached), the student's first strong view."""
        ctx.unlabeled_teacher, ctx.unlabeled_student = out_teacher, out1
        ctx.pseudo_labels, ctx.pseudo_confidence, ctx.cutmix_boxes = self.pseudo1, self.conf1, self.boxes1
        ctx.unsup_keep = (self.conf1 >= eta) & (self.pseudo1 != IGNORE_INDEX)

    def kept(self, eta: float) -> Tensor:
        return ((self.conf >= eta) & self.valid).sum().float() / self.valid.sum().clamp_min(1)


class UniMatch(SegmentationModule):
    """UniMatch V1: ``L = w (L_s + lambda_s (L_s1 + L_s2) + lambda_fp L_fp)`` with one network.

    Each step (official ``unimatch.py``):

    - the student, train mode, on ``cat(labeled, weak)`` with feature dropout (:func:`feature_dropout`, ``p =
      fp_dropout``): the clean half gives the labeled logits and the weak-view logits, the dropped half the
      feature-perturbed weak-view logits (its labeled part is computed, as officially, and unused);
    - the clean weak view, detached, gives pseudo-labels and confidences (Eq. 3);
    - each of the two strong views (``image_strong``, ``image_strong2``: independent colour draws of the same
      crop) gets its own CutMix (coin and boxes, probability ``cutmix_p``), applied alike to its copy of the
      pseudo-labels and confidences; the student runs once on ``cat(strong1, strong2)``;
    - ``L_s1``, ``L_s2`` (strong views) and ``L_fp`` (feature-perturbed weak view, unmixed labels) are
      :func:`~brpg_lightning.methods.fixmatch.fixmatch_loss`: CE where ``conf >= eta`` over the valid pixels.

    Logged terms (already weighted; ``w = loss_scale``): ``L_s = w L_s``, ``L_u = w lambda_s (L_s1 + L_s2)``,
    ``L_fp = w lambda_fp L_fp``. The official weights are ``w = 0.5``, ``lambda_s = 0.25``, ``lambda_fp = 0.5``:
    ``(loss_x + 0.25 loss_u_s1 + 0.25 loss_u_s2 + 0.5 loss_u_w_fp) / 2``.

    BRPG (the step seam): ``unlabeled_teacher`` is the clean weak-view forward, detached (the view the
    pseudo-labels are made on: bank features, no gradient); ``unlabeled_student`` is the first strong view's
    forward, with ``pseudo_labels``, ``pseudo_confidence``, ``cutmix_boxes`` and ``unsup_keep`` mixed with
    that view's boxes.

    Deviation from the official code: CutMix pastes image ``i + 1`` of the same batch (and its pseudo-labels
    from the same weak forward), as :class:`~brpg_lightning.methods.fixmatch.FixMatch` does, instead of a
    second unlabeled batch labeled by an extra eval-mode forward; the coin is per batch, not per image.

    Args:
        lambda_s: weight of each strong view's loss (official 0.25). lambda_fp: weight of the feature-perturbed
            stream (0.5). loss_scale: factor on every term of the method (official 0.5: the ``/ 2``; BRPG's
            ``L_pro`` is added unscaled). eta: confidence threshold (0.95). cutmix_p: CutMix probability per
            batch and strong view (0.5). fp_dropout: channel dropout probability of the stream (0.5).
        **kwargs: :class:`SegmentationModule` arguments.
    """

    strong_views = 2

    def __init__(
        self,
        *args: Any,
        lambda_s: float = 0.25,
        lambda_fp: float = 0.5,
        loss_scale: float = 0.5,
        eta: float = 0.95,
        cutmix_p: float = 0.5,
        fp_dropout: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lambda_s, self.lambda_fp, self.loss_scale = float(lambda_s), float(lambda_fp), float(loss_scale)
        self.eta, self.cutmix_p, self.fp_dropout = float(eta), float(cutmix_p), float(fp_dropout)

    def compute_step(self, batch: dict[str, Any]) -> TrainStepContext:
        x_l, y_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        u = batch["unlabeled"]
        b_l, b_u = x_l.shape[0], u["image"].shape[0]
        out = self.student(torch.cat([x_l, u["image"]]), perturb=feature_dropout(self.fp_dropout))
        clean, dropped = out.split([b_l + b_u, b_l + b_u])
        out_l, out_w = clean.split([b_l, b_u])
        out_fp = dropped.split([b_l, b_u])[1]
        out_w = out_w.detach()
        with torch.no_grad():
            _, conf, pseudo = self.hard_pseudo_labels(out_w, u["valid"])
            views = StrongViews(u, pseudo, conf, self.cutmix_p)
        out_s1, out_s2 = self.student(views.images()).split([b_u, b_u])

        size = tuple(y_l.shape[-2:])
        loss_fp = fixmatch_loss(out_fp.logits_at(size), pseudo, conf, self.eta)
        ctx = self.new_context(out_l, y_l)
        views.fill(ctx, out_w, out_s1, self.eta)
        w = self.loss_scale
        ctx.add_loss("L_s", w * self.supervised_loss(out_l, y_l))
        ctx.add_loss("L_u", w * self.lambda_s * views.loss(out_s1, out_s2, size, self.eta))
        ctx.add_loss("L_fp", w * self.lambda_fp * loss_fp)
        self.log_train("train/unsup_kept", views.kept(self.eta), b_l)
        return ctx
