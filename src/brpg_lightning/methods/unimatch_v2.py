"""UniMatch V2 (Yang et al., TPAMI 2025, "Pushing the Limit of Semi-Supervised Semantic Segmentation"): an EMA
teacher labels the weak view, two strong views share complementary channel dropout; the official
``unimatch_v2.py`` recipe."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.base import SegmentationModule
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.methods.ema import EMATeacher
from brpg_lightning.methods.unimatch import StrongViews

EVAL_ON = ("ema", "student")


def complementary_masks(pairs: int, channels: int, kept: Tensor, device: torch.device | None = None
                        ) -> tuple[Tensor, Tensor]:
    """Two ``(pairs, channels)`` channel masks, each channel kept (x2) in exactly one of them: ``m1 = 2
    Bernoulli(0.5)``, ``m2 = 2 - m1``; pairs where ``kept`` (bool ``(pairs,)``) get ones in both (no dropout).

    The rate is 0.5 by construction: only then is the complement ``2 - m1`` again a dropout mask with the
    ``1 / (1 - p)`` scale (official ``DPT.forward(comp_drop=True)``: ``binomial(probs=0.5) * 2``).
    """
    m1 = torch.bernoulli(torch.full((pairs, channels), 0.5, device=device)) * 2.0
    m2 = 2.0 - m1
    m1[kept], m2[kept] = 1.0, 1.0
    return m1, m2


def complementary_dropout(pair_p: float = 0.5) -> Callable[[list[Tensor]], list[Tensor]]:
    """The ``Segmentor(perturb=...)`` of UniMatch V2 for a batch ``cat(strong1, strong2)`` of ``2 n`` images.

    Image ``i`` of the first view and image ``i`` of the second (a pair) get complementary channel masks
    (:func:`complementary_masks`), constant over the spatial positions; ``int(n (1 - pair_p))`` pairs drawn at
    random are left unperturbed (official: ``dropout_prob = 0.5``, ``num_kept = int(bs // 2 * (1 -
    dropout_prob))``). The official ViT uses one mask for its four same-width layers; a CNN encoder's maps differ
    in width, so each map draws its own masks, with the same unperturbed pairs.
    """

    def perturb(feats: list[Tensor]) -> list[Tensor]:
        batch = feats[0].shape[0]
        if batch % 2:
            raise ValueError(f"complementary dropout needs two views of equal size, got a batch of {batch}")
        n = batch // 2
        kept = torch.zeros(n, dtype=torch.bool)
        kept[torch.randperm(n)[: int(n * (1.0 - pair_p))]] = True
        out = []
        for f in feats:
            m1, m2 = complementary_masks(n, f.shape[1], kept.to(f.device), device=f.device)
            out.append(f * torch.cat([m1, m2]).to(f.dtype)[:, :, None, None])
        return out

    return perturb


class UniMatchV2(SegmentationModule):
    """UniMatch V2: ``L = w (L_s + lambda_s (L_s1 + L_s2))``; pseudo-labels from an EMA teacher.

    Each step (official ``unimatch_v2.py``):

    - the EMA teacher, eval mode, on the weak view (no grad): pseudo-labels and confidences (Eq. 3);
    - each strong view gets its own CutMix (probability ``cutmix_p``), applied alike to its copy of the
      pseudo-labels and confidences;
    - the student on the labeled images alone, then on ``cat(strong1, strong2)`` with complementary channel
      dropout on the encoder maps (:func:`complementary_dropout`);
    - ``L_s1``, ``L_s2``: :func:`~brpg_lightning.methods.fixmatch.fixmatch_loss` (CE where ``conf >= eta`` over
      the valid pixels).
    - after the optimiser step the teacher's parameters and BN buffers follow the student's with decay
      ``min(1 - 1 / (t + 1), ema_decay)``, ``t`` counted from the first step of the run (warm-up included:
      the official teacher exists from iteration 0).

    Logged terms (weighted; ``w = loss_scale``): ``L_s = w L_s``, ``L_u = w lambda_s (L_s1 + L_s2)``; official
    ``w = 0.5``, ``lambda_s = 0.5``: ``(loss_x + (loss_u_s1 + loss_u_s2) / 2) / 2``.

    BRPG (the step seam): ``unlabeled_teacher`` is the EMA teacher's weak-view forward (the view and network
    the pseudo-labels are made on; no gradient), ``unlabeled_student`` the first strong view's forward (under
    its dropout mask), with ``pseudo_labels``, ``pseudo_confidence``, ``cutmix_boxes`` and ``unsup_keep`` of
    that view.

    Deviation from the official code: CutMix pastes image ``i + 1`` of the batch (official: the flipped batch,
    image ``B - 1 - i``), one coin per batch (official: per image).

    Args:
        lambda_s: weight of each strong view's loss (0.5). loss_scale: factor on every term of the method (0.5;
            BRPG's ``L_pro`` is added unscaled). eta: confidence threshold (0.95). cutmix_p: CutMix probability
            per batch and view (0.5). comp_drop_pair_p: share of view pairs that get complementary dropout (0.5).
        ema_decay: teacher EMA decay cap (0.996). eval_on: ``ema`` (the teacher) or ``student``; the official
            code evaluates both.
        **kwargs: :class:`SegmentationModule` arguments.
    """

    strong_views = 2

    def __init__(
        self,
        *args: Any,
        lambda_s: float = 0.5,
        loss_scale: float = 0.5,
        eta: float = 0.95,
        cutmix_p: float = 0.5,
        comp_drop_pair_p: float = 0.5,
        ema_decay: float = 0.996,
        eval_on: str = "ema",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if eval_on not in EVAL_ON:
            raise BRPGInputError(f"method.eval_on={eval_on!r}; expected one of {', '.join(EVAL_ON)}")
        if not 0.0 <= float(comp_drop_pair_p) <= 1.0:
            raise BRPGInputError(f"method.comp_drop_pair_p={comp_drop_pair_p}; expected a probability in [0, 1]")
        self.lambda_s, self.loss_scale, self.eta = float(lambda_s), float(loss_scale), float(eta)
        self.cutmix_p, self.comp_drop_pair_p, self.eval_on = float(cutmix_p), float(comp_drop_pair_p), eval_on
        # parameters and BN buffers, as the official loop averages both
        self.teacher = EMATeacher(self.student, decay=ema_decay, ramp=True, buffers=True)

    @property
    def eval_model(self) -> nn.Module:
        return self.teacher.module if self.eval_on == "ema" else self.student

    def compute_step(self, batch: dict[str, Any]) -> TrainStepContext:
        x_l, y_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        u = batch["unlabeled"]
        b_u = u["image"].shape[0]
        with torch.no_grad():
            self.teacher.eval()
            out_t = self.teacher(u["image"])
            _, conf, pseudo = self.hard_pseudo_labels(out_t, u["valid"])
            views = StrongViews(u, pseudo, conf, self.cutmix_p)
        out_l = self.student(x_l)
        perturb = complementary_dropout(self.comp_drop_pair_p)
        out_s1, out_s2 = self.student(views.images(), perturb=perturb).split([b_u, b_u])

        size = tuple(y_l.shape[-2:])
        ctx = self.new_context(out_l, y_l)
        views.fill(ctx, out_t, out_s1, self.eta)
        w = self.loss_scale
        ctx.add_loss("L_s", w * self.supervised_loss(out_l, y_l))
        ctx.add_loss("L_u", w * self.lambda_s * views.loss(out_s1, out_s2, size, self.eta))
        self.log_train("train/unsup_kept", views.kept(self.eta), x_l.shape[0])
        return ctx

    def after_optimizer_step(self) -> None:
        """EMA update of the teacher after the optimiser step (every step, warm-up included; with gradient
        accumulation once per optimiser step)."""
        self.log("train/ema_decay", self.teacher.update(self.student), batch_size=1)
