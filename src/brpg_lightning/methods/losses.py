"""Supervised losses: pixel cross-entropy (paper Eq. (2)) and U2PL's OHEM cross-entropy.

All functions take logits already at the label size, ``(B, C, H, W)`` against ``(B, H, W)`` long
labels, compute in float32, and return a finite scalar that keeps the graph even when no pixel counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError

SUPERVISED_LOSS_KINDS = ("ce", "ohem", "ce+ohem")


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean pixel cross-entropy over non-ignored pixels, Eq. (2).

    ``L_s = sum_{i,j: y_ij != ignore} l_ce(p_ij, y_ij) / #{i,j: y_ij != ignore}``, with
    ``logits (B, C, H, W)`` and ``target (B, H, W)``. All pixels ignored: ``0`` (``logits.sum() * 0``).

    Example:
        >>> logits = torch.zeros(1, 2, 1, 2)
        >>> round(cross_entropy(logits, torch.tensor([[[0, 255]]])).item(), 4)  # log 2
        0.6931
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp_min(1)


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    thresh: float = 0.7,
    min_kept: int = 100000,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Online hard example mining cross-entropy (U2PL's ``OhemCrossEntropy2dTensor``).

    With ``p_true`` the softmax probability of the target class at each valid pixel (``N`` of them):

    * ``N < min_kept``, ``N == 0`` or ``min_kept <= 0``: plain :func:`cross_entropy` over the valid
      pixels (U2PL drops pixels only inside its ``min_kept > 0`` branch, so ``thresh`` alone never
      selects anything);
    * otherwise the threshold is ``thresh``, raised to the ``k``-th smallest ``p_true``
      (``k = min(N, min_kept)``) when that value exceeds ``thresh``, and the loss is the mean
      cross-entropy over valid pixels with ``p_true <= threshold``.

    Shapes: ``logits (B, C, H, W)``, ``target (B, H, W)``.
    """
    logits = logits.float()
    valid = target != ignore_index
    num_valid = int(valid.sum())
    if num_valid == 0 or num_valid < min_kept or min_kept <= 0:
        return cross_entropy(logits, target, ignore_index)
    with torch.no_grad():
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        p_true = torch.softmax(logits, dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        kth = torch.kthvalue(p_true[valid], min(num_valid, min_kept)).values
        threshold = torch.maximum(torch.tensor(float(thresh), device=logits.device), kth)
        kept = valid & (p_true <= threshold)
    return cross_entropy(
        logits, torch.where(kept, target, torch.full_like(target, ignore_index)), ignore_index
    )


class SupervisedLoss(nn.Module):
    """The supervised loss ``L_s`` of a labeled batch: ``"ce"``, ``"ohem"`` or ``"ce+ohem"``.

    ``"ce"`` is Eq. (2) and ``"ohem"`` :func:`ohem_cross_entropy`, each with weight 1;
    ``"ce+ohem"`` is ``ce_weight * CE + ohem_weight * OHEM`` (every official BRPG config: 0.5 / 0.5).
    ``forward(logits (B, C, H, W), target (B, H, W)) -> scalar``.
    """

    def __init__(
        self,
        kind: str = "ce",
        ce_weight: float = 0.5,
        ohem_weight: float = 0.5,
        ohem_thresh: float = 0.7,
        ohem_min_kept: int = 100000,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        if kind not in SUPERVISED_LOSS_KINDS:
            raise BRPGInputError(f"supervised loss kind {kind!r} is not one of {SUPERVISED_LOSS_KINDS}")
        self.kind = kind
        self.ce_weight = float(ce_weight)
        self.ohem_weight = float(ohem_weight)
        self.ohem_thresh = float(ohem_thresh)
        self.ohem_min_kept = int(ohem_min_kept)
        self.ignore_index = int(ignore_index)

    def _ohem(self, logits: Tensor, target: Tensor) -> Tensor:
        return ohem_cross_entropy(logits, target, self.ohem_thresh, self.ohem_min_kept, self.ignore_index)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``L_s`` for ``logits (B, C, H, W)`` against ``target (B, H, W)``."""
        if self.kind == "ce":
            return cross_entropy(logits, target, self.ignore_index)
        if self.kind == "ohem":
            return self._ohem(logits, target)
        return self.ce_weight * cross_entropy(
            logits, target, self.ignore_index
        ) + self.ohem_weight * self._ohem(logits, target)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, ce_weight={self.ce_weight}, ohem_weight={self.ohem_weight}"
