"""Adaptive Prototype Optimization (APO, paper Sec. 3.4.2, Eq. 11-14, Table A.14).

Classes whose bank features are the most scattered get ``n_add`` extra K-Means centres:
``N_{alpha,c} = n_{0,alpha} + n_add * 1(D_{alpha,c} < gamma_t)`` (cosine) or ``> gamma_t`` (l2).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

INDICATORS = ("cosine", "l2")
APO_COUNTS = ("paper", "official")
"""How many classes APO picks: ``paper`` (Eq. 12/14 percentile rule, :func:`apo_extra`) or ``official``
(a fixed count of extremes, :func:`apo_extra_official`)."""

CHUNK_ELEMS = {"cpu": 2**20, "cuda": 2**27}
"""float32 elements of ``x`` converted at once, by device type (4 MiB: cache-sized on the CPU;
512 MiB on a GPU, where fewer, larger kernels win); other devices use the CUDA value."""



class Float32Chunks:
    """float32 slices ``x[:, s:e]`` of ``x (G, N, D)`` (any float dtype) with invalid rows zeroed,
    converted on every pass into one reused buffer of about ``budget`` elements (default
    :data:`CHUNK_ELEMS` for the device): no ``(G, N, D)`` float32 copy is made, and a cache-sized
    buffer makes the conversion cheap next to the work that reads it. Iterating yields
    ``(start, end, chunk)``; a chunk is only valid until the next one.
    """

    def __init__(self, x: Tensor, valid: Tensor, budget: int | None = None) -> None:
        self.x, self.valid = x, valid
        g, n, d = x.shape
        if budget is None:
            budget = CHUNK_ELEMS.get(x.device.type, CHUNK_ELEMS["cuda"])
        self.n = n
        self.rows = max(1, min(n, budget // max(1, g * d)))
        self.buffer = torch.empty(g, self.rows, d, dtype=torch.float32, device=x.device)
        # chunks with an invalid row are masked on every pass; one host sync here, none per pass
        holes = (~valid).any(0)
        pad = (-n) % self.rows
        holes = torch.cat([holes, holes.new_zeros(pad)]).view(-1, self.rows).any(1)
        self.holes = holes.tolist()

    def __iter__(self) -> Iterator[tuple[int, int, Tensor]]:
        for i, start in enumerate(range(0, self.n, self.rows)):
            end = min(self.n, start + self.rows)
            xc = self.buffer[:, : end - start]
            xc.copy_(self.x[:, start:end])
            if self.holes[i]:
                xc.masked_fill_(~self.valid[:, start:end, None], 0.0)
            yield start, end, xc


def _check(indicator: str) -> None:
    if indicator not in INDICATORS:
        raise ValueError(f"indicator={indicator!r}; expected one of {INDICATORS}")


def dispersion(x: Tensor, valid: Tensor, indicator: str = "cosine") -> Tensor:
    """Dispersion score of each group's features (Eq. 11 or Eq. 13).

    With ``V_g`` the number of valid features of group ``g`` and ``f_bar = (1 / V_g) sum_f f``:

    - ``"cosine"``, Eq. (11): ``D_sim = (1 / V_g) sum_f cos(f, f_bar)``; lower = more scattered.
    - ``"l2"``, Eq. (13): ``D_l2 = (1 / V_g) sum_f ||f - f_bar||_2``; higher = more scattered.

    Args:
        x: features ``(G, N, D)`` (any float dtype; read in float32 by chunks of ``N``, two passes).
        valid: ``(G, N)`` bool, the features of each group (e.g. the filled bank slots).
        indicator: ``"cosine"`` or ``"l2"``.

    Returns:
        ``(G,)`` float32, NaN for a group without valid features.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [4.0, 0.0]]])
        >>> dispersion(x, torch.ones(2, 2, dtype=torch.bool), "cosine")
        tensor([0.7071, 1.0000])
        >>> dispersion(x, torch.ones(2, 2, dtype=torch.bool), "l2")
        tensor([0.7071, 1.0000])
    """
    _check(indicator)
    g, _, d = x.shape
    valid = valid.to(device=x.device, dtype=torch.bool)
    count = valid.sum(1).float()
    filled = valid.any(0).nonzero()  # columns past the last valid point (a partly filled bank) are skipped
    n_used = int(filled.max()) + 1 if filled.numel() > 0 else 0
    x, valid = x[:, :n_used], valid[:, :n_used]
    chunks = Float32Chunks(x, valid)  # invalid rows read as 0
    total = torch.zeros(g, d, device=x.device)
    for _, _, xc in chunks:
        total += xc.sum(1)
    mean = total / count.clamp_min(1).unsqueeze(1)  # f_bar (G, D)
    score = torch.zeros(g, device=x.device)
    if indicator == "cosine":
        unit_mean = (mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-12)).unsqueeze(1)  # (G, 1, D)
        for _, _, xc in chunks:
            dots = torch.linalg.vecdot(xc, unit_mean, dim=2)  # (G, n): <f, f_bar / |f_bar|>
            cos = dots / torch.linalg.vector_norm(xc, dim=2).clamp_min(1e-12)  # 0 on invalid rows
            score += cos.sum(1)
    else:
        for s, e, xc in chunks:
            dist = torch.linalg.vector_norm(xc.sub_(mean.unsqueeze(1)), dim=2)  # the chunk is scratch
            score += (dist * valid[:, s:e]).sum(1)
    return torch.where(count > 0, score / count.clamp_min(1), math.nan)


def apo_extra(scores: Tensor, alpha_t: float = 0.05, indicator: str = "cosine", n_add: int = 1) -> Tensor:
    """Extra prototypes per class from dispersion scores ``(C,)`` (Eq. 12 / Eq. 14, Table A.14).

    - ``"cosine"``, Eq. (12): ``gamma_t = np.percentile(D, 100 * alpha_t)``, ``extra_c = n_add * 1(D_c < gamma_t)``.
    - ``"l2"``, Eq. (14): ``gamma_t = np.percentile(D, 100 * (1 - alpha_t))``, ``extra_c = n_add * 1(D_c > gamma_t)``.

    The percentile is numpy's (linear interpolation) over the non-NaN scores; a NaN score (empty
    bank) gets 0. The caller adds the result to ``n_0`` (``N_{alpha,c} = n_0 + extra_c``).

    Returns:
        ``(C,)`` long on the device of ``scores``.

    Example:
        >>> apo_extra(torch.tensor([0.9, 0.5, 0.8, float("nan"), 0.7, 0.95]), alpha_t=0.05)
        tensor([0, 1, 0, 0, 0, 0])
    """
    _check(indicator)
    s = scores.detach().double().cpu().numpy()
    finite = ~np.isnan(s)
    extra = np.zeros(s.shape, dtype=np.int64)
    if finite.any():
        if indicator == "cosine":
            gamma = np.percentile(s[finite], 100 * alpha_t)
            picked = finite & (np.where(finite, s, np.inf) < gamma)
        else:
            gamma = np.percentile(s[finite], 100 * (1 - alpha_t))
            picked = finite & (np.where(finite, s, -np.inf) > gamma)
        extra[picked] = int(n_add)
    return torch.from_numpy(extra).to(scores.device)


def official_pick_count(num_classes: int, alpha_t: float = 0.05) -> int:
    """Classes the official implementation gives extra prototypes: ``max(1, round(alpha_t * C))``.

    Python's ``round`` (halves to even) of the float product, as the official code computes it. The
    paper's percentile rule picks ``ceil(alpha_t * (C - 1))`` classes of distinct scores instead; the two
    differ e.g. for ``C = 22`` (official 1, paper 2).

    Example:
        >>> official_pick_count(21), official_pick_count(22), official_pick_count(81), official_pick_count(7)
        (1, 1, 4, 1)
    """
    return max(1, int(round(alpha_t * num_classes)))


def apo_extra_official(scores: Tensor, alpha_t: float = 0.05, indicator: str = "cosine", n_add: int = 1) -> Tensor:
    """Extra prototypes per class with the official implementation's count (option to :func:`apo_extra`).

    ``n = official_pick_count(C, alpha_t)`` with ``C = len(scores)``. ``"cosine"``: the threshold is the
    ``n``-th smallest score and every class with ``D_c <=`` it is picked; ``"l2"``: the ``n``-th largest and
    ``D_c >=`` it. Ties at the threshold are all picked, as in the official code. A NaN score (empty bank,
    which the official code cannot meet) is never picked and the ``n`` is taken among the other scores.

    Returns:
        ``(C,)`` long on the device of ``scores``.

    Example:
        >>> apo_extra_official(torch.tensor([0.9, 0.5, 0.8, float("nan"), 0.7, 0.95]), alpha_t=0.05)
        tensor([0, 1, 0, 0, 0, 0])
    """
    _check(indicator)
    s = scores.detach().double().cpu().numpy()
    finite = ~np.isnan(s)
    extra = np.zeros(s.shape, dtype=np.int64)
    n = min(official_pick_count(s.shape[0], alpha_t), int(finite.sum()))
    if n > 0:
        ordered = np.sort(s[finite])
        if indicator == "cosine":
            picked = finite & (np.where(finite, s, np.inf) <= ordered[n - 1])
        else:
            picked = finite & (np.where(finite, s, -np.inf) >= ordered[-n])
        extra[picked] = int(n_add)
    return torch.from_numpy(extra).to(scores.device)
