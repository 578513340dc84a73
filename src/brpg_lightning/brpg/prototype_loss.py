"""Prototype-based contrastive loss ``L_pro`` (paper Sec. 3.5, Eq. 15-18, 20)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from brpg_lightning.constants import IGNORE_INDEX


def prototype_similarities(feats: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarity of every feature to every prototype, ``(N, C, K)`` float32.

    ``<f / |f|, r / |r|>`` computed as ``(f . r_hat) / |f|``: the division runs on the ``(N, C K)``
    products instead of the ``(N, D)`` features (same value, a cheaper forward and backward).
    Gradients reach ``feats`` only (prototypes are non-learnable, updated by Eq. 22).
    """
    c, k, d = prototypes.shape
    with torch.autocast(device_type=feats.device.type, enabled=False):
        f = feats.float()
        r = F.normalize(prototypes.detach().float(), dim=2).reshape(c * k, d)
        inv = torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(1e-12).reciprocal()
        return ((f @ r.t()) * inv).view(-1, c, k)


def class_similarity(
    feats: Tensor, prototypes: Tensor, proto_mask: Tensor, sim: Tensor | None = None
) -> Tensor:
    """Eq. (15): ``s_{i,c} = max_k <f_i / |f_i|, r_{c,k} / |r_{c,k}|>`` over the real prototypes of ``c``.

    Args:
        feats: sampled features ``(N, D)``.
        prototypes: ``(C, K, D)`` padded prototypes.
        proto_mask: ``(C, K)`` bool, True on real prototypes.
        sim: :func:`prototype_similarities` of ``feats`` when already computed.

    Returns:
        ``(N, C)`` float32 cosine similarities; ``-inf`` for a class without prototypes. Gradients
        reach ``feats`` only (prototypes are non-learnable, updated by Eq. 22).

    Example:
        >>> protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [9.0, 9.0]]])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> class_similarity(torch.tensor([[2.0, 0.0]]), protos, mask)
        tensor([[ 1., -1.]])
    """
    c, k, _ = prototypes.shape
    if sim is None:
        sim = prototype_similarities(feats, prototypes)
    sim = sim.masked_fill(~proto_mask.to(sim.device).view(1, c, k), float("-inf"))
    return sim.max(dim=2).values


def prototype_ce(
    feats: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    proto_mask: Tensor,
    tau: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
    sim: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Prototype cross-entropy, Eq. (16)-(18): ``mean_i -log softmax_c(s_{i,c} / tau)[y_i]``.

    ``p_{i,c} = exp(s_{i,c} / tau) / sum_t exp(s_{i,t} / tau)`` (Eq. 16) with ``s`` from Eq. (15); the
    sum runs over the classes that have prototypes. The mean divides by the number of used points:
    points labeled ``ignore_index`` or whose class has no prototype are not used (for grid points
    with valid labels this is Eq. (17)'s ``B_l * M_l``; for Eq. (18) the caller passes only the points
    that passed ``eta_t``). Computed in float32 with autocast disabled.

    Args:
        feats: ``(N, D)`` sampled features (with grad).
        labels: ``(N,)`` long, ground truth (Eq. 17) or teacher pseudo-labels (Eq. 18).
        prototypes: ``(C, K, D)``; proto_mask: ``(C, K)`` bool. tau: temperature (0.1).
        sim: :func:`prototype_similarities` of ``feats`` when already computed (e.g. shared with the
            Eq. 22 assignment). Similarities are computed for every point and the used rows selected
            afterwards, so no ``(N, D)`` copy of the features is made.

    Returns:
        ``(loss, n_used)``; with no used point the loss is ``feats.sum() * 0`` (finite, in the graph).

    Example:
        >>> protos, mask = torch.eye(2).view(2, 1, 2), torch.ones(2, 1, dtype=torch.bool)
        >>> loss, n = prototype_ce(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 255]), protos, mask, tau=1.0)
        >>> round(loss.item(), 4), n  # -log(e / (e + 1))
        (0.3133, 1)
    """
    c = prototypes.shape[0]
    has_proto = proto_mask.to(labels.device).any(1)  # (C,)
    in_range = (labels >= 0) & (labels < c) & (labels != ignore_index)
    used = in_range & has_proto[labels.clamp(0, c - 1)]
    n_used = int(used.sum())
    if n_used == 0:
        return feats.sum() * 0.0, 0
    with torch.autocast(device_type=feats.device.type, enabled=False):
        sim = class_similarity(feats, prototypes, proto_mask, sim)[used]  # (n, C), -inf without prototypes
        logp = torch.log_softmax(sim / tau, dim=1)
        loss = -logp.gather(1, labels[used].unsqueeze(1)).mean()
    return loss, n_used
