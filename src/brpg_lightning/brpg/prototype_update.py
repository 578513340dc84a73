"""Online prototype update (paper Sec. 3.5, Eq. 22)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from brpg_lightning.constants import IGNORE_INDEX


def assignment_stats(
    feats: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    proto_mask: Tensor,
    ignore_index: int = IGNORE_INDEX,
    sim: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-prototype sums and counts of the features assigned to it (the terms of ``f_bar_{c,k}``, Eq. 22).

    Each feature with a label (``!= ignore_index``) whose class has prototypes is assigned to the most
    cosine-similar real prototype of its own class (ground truth for labeled points, pseudo-label for
    unlabeled ones). Features are used as given (detached, float32, un-normalised), so the sums live
    in the prototypes' space. Sums and counts are additive over batches and ranks: all-reduce both
    before :func:`ema_update`.

    Args:
        feats: ``(N, D)``; labels: ``(N,)`` long; prototypes: ``(C, K, D)``; proto_mask: ``(C, K)`` bool.
        sim: the ``(N, C, K)`` cosine similarities of ``feats`` to ``prototypes`` when already computed
            (``prototype_loss.prototype_similarities``, shared with L_pro); else computed here.

    Returns:
        ``sums (C, K, D)`` float32 and ``counts (C, K)`` float32.

    Example:
        >>> protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> sums, counts = assignment_stats(torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 5.0]]),
        ...     torch.tensor([0, 0, 255]), protos, torch.ones(1, 2, dtype=torch.bool))
        >>> sums.tolist(), counts.tolist()
        ([[[2.0, 1.0], [0.0, 3.0]]], [[1.0, 1.0]])
    """
    c, k, d = prototypes.shape
    feats = feats.detach().float()
    mask = proto_mask.to(feats.device)
    labels = labels.to(feats.device)
    sums = torch.zeros(c * k, d, device=feats.device)
    counts = torch.zeros(c * k, device=feats.device)
    has_proto = mask.any(1)
    used = (labels >= 0) & (labels < c) & (labels != ignore_index)
    used &= has_proto[labels.clamp(0, c - 1)]
    f, y = feats[used], labels[used]
    if y.numel() > 0:
        with torch.autocast(device_type=feats.device.type, enabled=False):
            if sim is None:
                r = F.normalize(prototypes.detach().float(), dim=2).view(c * k, d)
                sim = (F.normalize(f, dim=1) @ r.t()).view(-1, c, k)  # (n, C, K), one small matmul
            else:
                sim = sim.detach().float()[used]
            own = sim[torch.arange(y.numel(), device=y.device), y]  # (n, K): prototypes of its own class
            best = own.masked_fill(~mask[y], float("-inf")).argmax(1)  # (n,)
        slot = y * k + best
        sums.index_add_(0, slot, f)
        counts.index_add_(0, slot, torch.ones_like(slot, dtype=torch.float32))
    return sums.view(c, k, d), counts.view(c, k)


def ema_update(prototypes: Tensor, sums: Tensor, counts: Tensor, alpha: float = 0.99) -> Tensor:
    """Eq. (22): ``r_{c,k} <- alpha * r_{c,k} + (1 - alpha) * f_bar_{c,k}``, ``f_bar = sums / counts``.

    Prototypes with ``counts == 0`` (nothing assigned this step, or masked) are unchanged.

    Returns:
        New prototypes ``(C, K, D)`` float32 (the input is not modified).

    Example:
        >>> ema_update(torch.zeros(1, 2, 1), torch.tensor([[[4.0], [7.0]]]), torch.tensor([[2.0, 0.0]]), 0.5).tolist()
        [[[1.0], [0.0]]]
    """
    protos = prototypes.float()
    counts = counts.to(protos.device).float()
    mean = sums.to(protos.device).float() / counts.clamp_min(1.0).unsqueeze(2)
    return torch.where((counts > 0).unsqueeze(2), alpha * protos + (1.0 - alpha) * mean, protos)
