"""Class-specific sampling thresholds ``eta_s`` (paper Table 8, "EMA 0.7-0.9" option).

The paper (Sec. 4.3) gives the values: every class starts at 0.8, the thresholds follow an EMA with
decay 0.999 of "the mean confidence predicted for each category" during the sampling stage, bounded
by 0.7 and 0.9. Where it is silent, the official implementation decides:

- the confidence of a class is the mean softmax probability *of that class* over the labeled pixels
  whose ground truth is that class, on the logits upsampled to the input resolution
  (:func:`class_confidence_sums`);
- the EMA is stored unclamped (:func:`update_class_thresholds`); the bounds apply only where the
  thresholds are used, and the ``fixed`` classes use the fixed ``eta_s`` (:func:`thresholds_in_use`);
- the thresholds split the labeled features only: unlabeled features keep the fixed ``eta_s``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.models.output import as_probabilities, resize_to_input


def class_confidence_sums(
    logits: Tensor, labels: Tensor, stride: int, num_classes: int, align_corners: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-class sums and counts of the ground-truth class probability at the input resolution.

    ``logits (B, C, h, w)`` at the decoder resolution are upsampled to the size of ``labels (B, H, W)``
    (:func:`~brpg_lightning.models.output.resize_to_input` with the segmentor's ``align_corners``), then softmaxed in float32. For every class
    ``c``: ``sums[c] = sum_i p_i[c]`` over the pixels ``i`` with ``labels_i = c`` and ``counts[c]`` their
    number; pixels labeled ``IGNORE_INDEX`` count nowhere. ``sums / counts`` is the class's mean
    confidence. One image is upsampled at a time, so no ``(B, C, H, W)`` map is held.

    Returns:
        ``sums (C,)`` float32 and ``counts (C,)`` float32 on the device of ``logits``.

    Example:
        >>> logits = torch.log(torch.tensor([0.6, 0.4])).view(1, 2, 1, 1)
        >>> class_confidence_sums(logits, torch.tensor([[[0, 1]]]), stride=2, num_classes=2)
        (tensor([0.6000, 0.4000]), tensor([1., 1.]))
    """
    size = tuple(labels.shape[-2:])
    sums = torch.zeros(num_classes, device=logits.device)
    counts = torch.zeros(num_classes, device=logits.device)
    for lo, y in zip(logits.detach(), labels.to(logits.device), strict=True):
        probs = as_probabilities(resize_to_input(lo.unsqueeze(0), size, stride, align_corners=align_corners))[0]  # (C, H, W)
        keep = (y != IGNORE_INDEX) & (y >= 0) & (y < num_classes)
        y = y[keep]
        p_true = probs.permute(1, 2, 0)[keep].gather(1, y.unsqueeze(1)).squeeze(1)
        sums.index_add_(0, y, p_true)
        counts += torch.bincount(y, minlength=num_classes).float()
    return sums, counts


def update_class_thresholds(thresholds: Tensor, sums: Tensor, counts: Tensor, decay: float = 0.999) -> Tensor:
    """One EMA step of the per-class thresholds (Table 8), stored unclamped.

    For every class ``c`` with ``counts[c] > 0``: ``t_c <- decay * t_c + (1 - decay) * sums[c] / counts[c]``;
    the other classes keep ``t_c``. The bounds are applied by :func:`thresholds_in_use`, not here, so
    a class whose confidence stays outside them keeps moving.

    Returns:
        New thresholds ``(C,)`` float32 (the input is not modified).

    Example:
        >>> update_class_thresholds(torch.full((2,), 0.8), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), 0.5)
        tensor([0.6500, 0.8000])
    """
    t = thresholds.float()
    sums, counts = sums.to(t), counts.to(t)
    mean = sums / counts.clamp_min(1.0)
    return torch.where(counts > 0, decay * t + (1.0 - decay) * mean, t)


def thresholds_in_use(
    thresholds: Tensor,
    low: float = 0.7,
    high: float = 0.9,
    fixed_classes: Sequence[int] = (),
    fixed_value: float = 0.8,
) -> Tensor:
    """The per-class ``eta_s`` that splits labeled features: ``min(max(t_c, low), high)``, and
    ``fixed_value`` (the fixed ``eta_s``) for the classes in ``fixed_classes``.

    Example:
        >>> thresholds_in_use(torch.tensor([0.5, 0.95, 0.8, 0.6]), 0.7, 0.9, fixed_classes=[3], fixed_value=0.8)
        tensor([0.7000, 0.9000, 0.8000, 0.8000])
    """
    out = thresholds.float().clamp(low, high)
    if len(fixed_classes) > 0:
        out[torch.as_tensor(list(fixed_classes), dtype=torch.long, device=out.device)] = float(fixed_value)
    return out
