"""Class-specific sampling thresholds ``eta_s`` (paper Table 8, "EMA 0.7-0.9" option)."""

from __future__ import annotations

import torch
from torch import Tensor

from brpg_lightning.constants import IGNORE_INDEX


def update_class_thresholds(
    thresholds: Tensor,
    conf: Tensor,
    labels: Tensor,
    decay: float = 0.999,
    low: float = 0.7,
    high: float = 0.9,
) -> Tensor:
    """One EMA step of the per-class confidence thresholds (Sec. 4.3, Table 8).

    For every class ``c`` present among ``labels`` (``!= IGNORE_INDEX``):
    ``t_c <- decay * t_c + (1 - decay) * mean(conf_i : labels_i = c)``, the mean taken over the
    ``n_c`` pixels of class ``c`` (denominator ``n_c``); absent classes keep ``t_c``. The result is
    clamped to ``[low, high]``. The callback starts every class at 0.8.

    Args:
        thresholds: current thresholds ``(C,)``.
        conf: confidence probability (max softmax) of each pixel ``(N,)``.
        labels: class of each pixel ``(N,)`` long.

    Returns:
        New thresholds ``(C,)`` float32 (the input is not modified).

    Example:
        >>> t = torch.full((3,), 0.8)
        >>> update_class_thresholds(t, torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 255]), decay=0.5)
        tensor([0.7000, 0.8000, 0.8000])
    """
    t = thresholds.float()
    c = t.shape[0]
    labels = labels.to(t.device).reshape(-1)
    conf = conf.to(device=t.device, dtype=torch.float32).reshape(-1)
    keep = (labels != IGNORE_INDEX) & (labels >= 0) & (labels < c)
    labels, conf = labels[keep], conf[keep]
    counts = torch.bincount(labels, minlength=c).float()
    sums = torch.zeros(c, device=t.device).index_add_(0, labels, conf)
    mean = sums / counts.clamp_min(1.0)
    updated = torch.where(counts > 0, decay * t + (1.0 - decay) * mean, t)
    return updated.clamp(low, high)
