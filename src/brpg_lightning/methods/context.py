"""The seam between a method and step-level plug-ins such as the BRPG callback.

Every semi-supervised method (mean teacher, FixMatch; CPS one per network) builds one
:class:`TrainStepContext` per training step and network, after its own losses and before the backward pass, and
hands it to every ``trainer.callbacks`` entry that implements :class:`StepContextHook`. A hook reads
the tensors it needs and adds loss terms with :meth:`TrainStepContext.add_loss`; the method sums
``ctx.losses`` into the loss it returns to Lightning. Nothing else of the method is touched from outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from brpg_lightning.models.output import SegmentorOutput


@dataclass
class TrainStepContext:
    """Tensors of one training step (shapes: ``B_l`` labeled, ``B_u`` unlabeled, crop ``H x W``,
    decoder resolution ``h x w``).

    Attributes:
        epoch: current epoch (0-based; an epoch is one pass over the unlabeled set).
        global_step: optimiser steps done before this one.
        total_steps: optimiser steps of the whole run (``trainer.estimated_stepping_batches``).
        labeled: student forward on the labeled weak view (logits, features, decoder), with grad.
        labels: ground truth ``(B_l, H, W)`` long, ``IGNORE_INDEX`` where void or padding.
        unlabeled_teacher: teacher forward on the unlabeled weak view (no grad), or ``None`` while
            the method has no unlabeled branch (e.g. mean teacher's supervised-only warm-up).
        unlabeled_student: student forward on the unlabeled strong view (colour jitter + CutMix), with grad.
        pseudo_labels: teacher pseudo-labels of the strong view ``(B_u, H, W)`` long, mixed with the
            same CutMix boxes as the image; ``IGNORE_INDEX`` on padding. Not filtered by the method's
            unsupervised filter (each consumer applies its own threshold).
        pseudo_confidence: teacher max-softmax of the strong view ``(B_u, H, W)`` float, mixed alike;
            0 on padding.
        unsup_keep: the pixels the method's own unsupervised loss trains on ``(B_u, H, W)`` bool (its
            filter over the valid pixels), or ``None`` when the method has no such mask.
        cutmix_boxes: the step's CutMix boxes ``(B_u, H, W)`` bool (pixels of image ``i`` taken from image
            ``(i + 1) % B_u``; all False when the batch was not mixed), or ``None`` without CutMix; a plug-in
            mixes its own per-pixel maps of the batch with them (``methods.cutmix.mix_like``).
        losses: loss terms, already weighted, summed by the method into the returned loss.
        network: which of the method's networks the tensors belong to (``SegmentationModule.networks``):
            ``"student"`` for one-network methods; CPS publishes one context per network (``"net1"``,
            ``"net2"``) and a plug-in such as BRPG keeps separate state per network.
        optimizer_step: whether the optimiser steps after this batch. False on the micro-batches of a gradient
            accumulation (``trainer.accumulate_grad_batches = k > 1``) before its last: state that must advance
            once per optimiser step (BRPG's prototype EMA and class thresholds) gathers their statistics until a
            context with True comes (``SegmentationModule.optimizer_steps_now``).
    """

    epoch: int
    global_step: int
    total_steps: int
    labeled: SegmentorOutput
    labels: Tensor
    unlabeled_teacher: SegmentorOutput | None = None
    unlabeled_student: SegmentorOutput | None = None
    pseudo_labels: Tensor | None = None
    pseudo_confidence: Tensor | None = None
    unsup_keep: Tensor | None = None
    cutmix_boxes: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    network: str = "student"
    optimizer_step: bool = True

    @property
    def has_unlabeled(self) -> bool:
        """True when the unlabeled tensors are filled in."""
        return self.unlabeled_teacher is not None and self.unlabeled_student is not None

    def add_loss(self, name: str, value: Tensor) -> None:
        """Add a (weighted) loss term; it joins the backward pass of this step.

        Raises ``ValueError`` for a duplicate name. A non-finite value is not checked here (a host sync per
        term): the method's ``training_step`` checks the summed loss once per step and names the term
        (``SegmentationModule.check_finite``).
        """
        if name in self.losses:
            raise ValueError(f"loss {name!r} was already added this step")
        self.losses[name] = value

    def total_loss(self) -> Tensor:
        """Sum of all loss terms."""
        if not self.losses:
            raise ValueError("no loss terms in this step")
        return torch.stack([v.float() for v in self.losses.values()]).sum()


@runtime_checkable
class StepContextHook(Protocol):
    """A callback that takes part in the training step (implemented by ``BRPGCallback``)."""

    def on_train_step_context(self, trainer, pl_module, ctx: TrainStepContext) -> None:  # noqa: ANN001
        """Read ``ctx`` and optionally :meth:`TrainStepContext.add_loss`. Called once per step."""
        ...
