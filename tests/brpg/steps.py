"""Synthetic BRPG steps shared by the memory and callback tests: features planted per class, confident logits."""

from __future__ import annotations

import torch

from brpg_lightning.brpg.prototype_memory import PrototypeMemory
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.models.output import SegmentorOutput

C, D, H, W, S = 4, 8, 16, 16, 4  # classes, feature dim, crop, stride
SMALL = dict(V=64, sample_num=20, grid=4, M_u=10, kmeans_iters=10)
"""The small budget both suites use (banks of 64, caps of 20 per image, a 4 x 4 grid, 10 points per image)."""


def make_ctx(epoch: int, step: int, total: int, seed: int, grad: bool = False) -> TrainStepContext:
    """A step whose features cluster by class, with confident predictions (most pixels pass eta_s)."""
    g = torch.Generator().manual_seed(seed)
    h, w = H // S, W // S

    def out(b: int) -> tuple[SegmentorOutput, torch.Tensor]:
        labels = torch.randint(0, C, (b, h, w), generator=g)
        logits = 3.0 * torch.nn.functional.one_hot(labels, C).permute(0, 3, 1, 2).float()
        logits = logits + torch.rand(b, C, h, w, generator=g) * 4.0  # some pixels become low-confidence
        centres = torch.eye(C, D) * 5.0
        feats = centres[labels].permute(0, 3, 1, 2) + torch.randn(b, D, h, w, generator=g) * 0.3
        if grad:
            feats.requires_grad_(True)
        return SegmentorOutput(logits, feats, feats, S), labels

    lab_out, lab = out(2)
    labels_full = lab.repeat_interleave(S, 1).repeat_interleave(S, 2)
    t_out, t_lab = out(2)
    s_out, _ = out(2)
    return TrainStepContext(
        epoch=epoch, global_step=step, total_steps=total, labeled=lab_out, labels=labels_full,
        unlabeled_teacher=t_out, unlabeled_student=s_out,
        pseudo_labels=t_lab.repeat_interleave(S, 1).repeat_interleave(S, 2),
        pseudo_confidence=torch.rand(2, H, W, generator=g) * 0.3 + 0.7,
    )


def make_memory(**kwargs) -> PrototypeMemory:
    """A :class:`PrototypeMemory` of ``C`` classes with the :data:`SMALL` budget (``kwargs`` override)."""
    return PrototypeMemory(**{**SMALL, **kwargs}, num_classes=C)
