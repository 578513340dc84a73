"""Teacher pseudo-labels, their filters and the unsupervised loss (paper Eq. (3)-(6), U2PL).

Shapes: ``probs (B, C, H, W)`` teacher softmax probabilities; per-pixel maps ``(B, H, W)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError

UNSUP_FILTER_KINDS = ("confidence", "entropy", "entropy_percentile")


def pseudo_label(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Confidence ``max_c p`` and pseudo-label ``argmax_c p`` per pixel, Eq. (3).

    ``probs (B, C, H, W)`` -> ``(conf (B, H, W), label (B, H, W) long)``.

    Example:
        >>> conf, label = pseudo_label(torch.tensor([0.2, 0.7, 0.1]).view(1, 3, 1, 1))
        >>> conf.flatten().tolist(), label.flatten().tolist()
        ([0.699999988079071], [1])
    """
    conf, label = probs.max(dim=1)
    return conf, label


def entropy(probs: Tensor) -> Tensor:
    """Pixel entropy ``H(p) = -sum_c p_c log p_c`` (natural log, ``0 log 0 := 0``), ``(B, C, H, W) -> (B, H, W)``.

    Example:
        >>> round(entropy(torch.tensor([0.5, 0.5, 0.0]).view(1, 3, 1, 1)).item(), 4)  # log 2
        0.6931
    """
    return -torch.special.xlogy(probs, probs).sum(dim=1)


def confidence_mask(conf: Tensor, eta: float) -> Tensor:
    """``M = 1(max_c p >= eta)``, Eq. (4); ``conf (B, H, W)`` -> bool ``(B, H, W)``."""
    return conf >= eta


def entropy_mask(probs: Tensor, beta: float) -> Tensor:
    """``M = 1(H(p) < beta)``, Eq. (5); ``probs (B, C, H, W)`` -> bool ``(B, H, W)``."""
    return entropy(probs) < beta


def _percentile_linear(values: Tensor, q: float) -> Tensor:
    """``np.percentile(values, q)`` (method ``"linear"``) of a non-empty 1-D tensor, with no size limit."""
    n = values.numel()
    pos = q / 100.0 * (n - 1)
    lo = min(max(math.floor(pos), 0), n - 1)
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(values, lo + 1).values
    if hi == lo or pos == lo:
        return v_lo
    v_hi = torch.kthvalue(values, hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


def entropy_percentile_mask(ent: Tensor, valid: Tensor, drop_percent: float) -> Tensor:
    """Keep-mask dropping the ``drop_percent`` % highest-entropy valid pixels (U2PL).

    ``thresh = percentile(ent[valid], 100 - drop_percent)`` (linear interpolation, as
    ``np.percentile``), ``keep = valid & (ent < thresh)``. ``drop_percent <= 0`` keeps every valid
    pixel; no valid pixel gives all ``False``. ``ent, valid (B, H, W)`` -> bool ``(B, H, W)``.

    Example:
        >>> ent = torch.tensor([[[0.1, 0.4], [0.2, 0.3]]])
        >>> entropy_percentile_mask(ent, torch.ones_like(ent, dtype=torch.bool), 50.0).tolist()
        [[[True, False], [True, False]]]
    """
    valid = valid.bool()
    if drop_percent <= 0:
        return valid.clone()
    values = ent[valid]
    if values.numel() == 0:
        return torch.zeros_like(valid)
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    thresh = _percentile_linear(values, 100.0 - min(float(drop_percent), 100.0))
    return valid & (ent < thresh)


def drop_percent_schedule(epoch: int, max_epochs: int, start: float = 20.0) -> float:
    """Share (%) of valid pixels to drop at ``epoch``: ``start * (1 - epoch / max_epochs)`` (U2PL).

    U2PL writes it as ``100 - (100 - drop_percent) * (1 - epoch / epochs)`` percentile with
    ``drop_percent = 80``, i.e. ``start = 20``.

    Example:
        >>> drop_percent_schedule(0, 80), drop_percent_schedule(40, 80)
        (20.0, 10.0)
    """
    if max_epochs <= 0:
        raise ValueError(f"max_epochs must be positive, got {max_epochs}")
    return float(start) * (1.0 - epoch / max_epochs)


def unsup_filter_mask(
    kind: str, probs: Tensor, valid: Tensor, *, eta: float, beta: float, drop_percent: float
) -> Tensor:
    """Pseudo-label keep-mask ``M`` of the method's filter, restricted to ``valid`` pixels.

    ``"confidence"``: Eq. (4) with ``eta``; ``"entropy"``: Eq. (5) with ``beta``;
    ``"entropy_percentile"``: :func:`entropy_percentile_mask` with ``drop_percent`` (U2PL).
    ``probs (B, C, H, W)``, ``valid (B, H, W)`` bool -> bool ``(B, H, W)``.
    """
    valid = valid.bool()
    if kind == "confidence":
        return valid & confidence_mask(probs.max(dim=1).values, eta)
    if kind == "entropy":
        return valid & entropy_mask(probs, beta)
    if kind == "entropy_percentile":
        return entropy_percentile_mask(entropy(probs), valid, drop_percent)
    raise BRPGInputError(f"unsupervised filter {kind!r} is not one of {UNSUP_FILTER_KINDS}")


def masked_cross_entropy(
    logits: Tensor, target: Tensor, keep: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Unsupervised loss, Eq. (6): ``L_u = sum_{ij} l_ce(p_ij, g_ij) M_ij / M``, ``M = sum_{ij} M_ij``.

    ``logits (B, C, H, W)`` student, ``target (B, H, W)`` long pseudo-labels, ``keep (B, H, W)``
    bool mask ``M``; pixels whose target is ``ignore_index`` never count. ``M = 0``: ``0`` with the
    graph kept (``logits.sum() * 0``).

    Example:
        >>> logits = torch.zeros(1, 2, 1, 2)
        >>> keep = torch.tensor([[[True, False]]])
        >>> round(masked_cross_entropy(logits, torch.tensor([[[1, 0]]]), keep).item(), 4)  # log 2
        0.6931
    """
    kept = keep.bool() & (target != ignore_index)
    masked_target = torch.where(kept, target, torch.full_like(target, ignore_index))
    total = F.cross_entropy(logits.float(), masked_target, ignore_index=ignore_index, reduction="sum")
    return total / kept.sum().clamp_min(1)
