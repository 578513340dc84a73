"""K-Means for CPG (paper Eq. 10) by faiss, one (class, bank) group at a time; random prototypes (Fig. 7).

``R_c = {Cluster(Memory_h,c, N_h,c), Cluster(Memory_lw,c, N_lw,c)}``: groups are the rows of a padded
``(G, N, D)`` tensor (``G`` = banks x classes, ``N`` = bank capacity ``V``) with a validity mask and a
per-group number of centres (APO may add one, Eq. 12). Each group's valid points are clustered by
``faiss.Kmeans`` (k-means++ seeding, ``n_init`` restarts keeping the lowest objective, ``iters`` Lloyd
iterations) on every point of the group, in float32 on the CPU (``faiss-cpu``; banks on a GPU are
copied to the host one group at a time).

Why faiss: ``python -m benchmarks --only clustering`` (under the shared lock, 2 CPU cores)
compares it with the batched hand-written K-Means this module held before and with scikit-learn's
``MiniBatchKMeans`` (the official implementation's), on the same data, same iterations, restarts and
``k`` (locked, 1 thread). On the benchmark's bank-like set (14 partly filled banks, weakly separated
ReLU features, the regime of real banks at ``T_S2``) faiss took 1.31 s against 1.69 s for the
hand-written batched K-Means this module held before, mean inertia 0.998x; in the default run (126k
bank features, locked, 2 cores) clustering took 6.4 s against 10.3 s. On well separated blobs (42 full
banks), where the hand-written one converged after a few passes on a subset, faiss was slower (11.6 s
against 3.1 s) with a mean inertia 0.3 % higher; scikit-learn's ``MiniBatchKMeans`` (the official
code's) was 1.6 % (blobs) and 0.4 % (bank-like) higher. Seeds are fixed and the caller broadcasts rank 0's centres, so
every rank holds the same prototypes whatever the thread count.
"""

from __future__ import annotations

from typing import NamedTuple

import faiss
import numpy as np
import torch
from torch import Tensor


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans` for ``G`` groups of ``N`` points in ``D`` dimensions.

    Attributes:
        centers: ``(G, K_max, D)`` float32; rows where ``center_mask`` is False are zero.
        center_mask: ``(G, K_max)`` bool, True on real centres.
        inertia: ``(G,)`` float32, sum over valid points of the squared distance to the nearest centre
            (scikit-learn's ``inertia_``); 0 for a group without centres.
        labels: ``(G, N)`` long, nearest centre of each valid point; -1 on invalid points.
        n_iter: Lloyd iterations per restart (faiss runs all of them).
        deficient: ``(G,)`` bool, groups that got fewer centres than asked (fewer distinct valid points
            than ``k``; all of their distinct points are centres).
    """

    centers: Tensor
    center_mask: Tensor
    inertia: Tensor
    labels: Tensor
    n_iter: int
    deficient: Tensor


def _check(x: Tensor, valid: Tensor, k: Tensor, k_max: int | None, name: str) -> int:
    if x.ndim != 3 or valid.shape != x.shape[:2] or k.shape != x.shape[:1]:
        raise ValueError(
            f"{name} expects x (G, N, D), valid (G, N), k (G,); got {tuple(x.shape)}, {tuple(valid.shape)}, "
            f"{tuple(k.shape)}"
        )
    k_top = int(k.max()) if k.numel() > 0 else 0
    k_max = k_top if k_max is None else int(k_max)
    if k_max < k_top:
        raise ValueError(f"k_max={k_max} is smaller than max(k)={k_top}")
    return k_max


def _assign(points: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centre and squared distance of each point (``|x|^2 - 2 x.c + |c|^2`` in float32; values
    below ``1e-6 (|x|^2 + |c|^2)`` are cancellation noise and count as 0; the inertia is summed in float64)."""
    c = centers.float()
    scale = (points * points).sum(1, keepdim=True) + (c * c).sum(1)
    d2 = torch.addmm(scale, points, c.t(), beta=1.0, alpha=-2.0)
    d2 = d2.masked_fill_(d2 <= 1e-6 * scale, 0.0)  # float32 cancellation noise: a point on a centre is at 0
    best = d2.min(1)
    return best.indices, best.values.double()


def _finish(
    x: Tensor, valid: Tensor, k: Tensor, k_max: int, centers_of: list[Tensor | None], n_iter: int
) -> KMeansResult:
    """Pad per-group centres into a :class:`KMeansResult` with labels and inertia of every valid point."""
    g, n, d = x.shape
    device = x.device
    centers = torch.zeros(g, k_max, d)
    cmask = torch.zeros(g, k_max, dtype=torch.bool)
    inertia = torch.zeros(g)
    labels = torch.full((g, n), -1, dtype=torch.long)
    valid_cpu = valid.cpu()
    for gi, cen in enumerate(centers_of):
        if cen is None or cen.shape[0] == 0:
            continue
        m = cen.shape[0]
        centers[gi, :m], cmask[gi, :m] = cen, True
        rows = valid_cpu[gi].nonzero().squeeze(1)
        lab, dist = _assign(x[gi].index_select(0, rows.to(device)).float().cpu(), cen)
        labels[gi, rows] = lab
        inertia[gi] = dist.sum().float()
    deficient = cmask.sum(1) < k.cpu()
    return KMeansResult(
        centers.to(device), cmask.to(device), inertia.to(device), labels.to(device), n_iter, deficient.to(device)
    )


def kmeans(
    x: Tensor,
    valid: Tensor,
    k: Tensor,
    *,
    k_max: int | None = None,
    iters: int = 50,
    seed: int = 0,
    n_init: int = 3,
    points_per_centroid: int | None = None,
) -> KMeansResult:
    """K-Means of ``G`` groups (CPG's ``Cluster(Memory_{alpha,c}, N_{alpha,c})``, Eq. 10) by ``faiss.Kmeans``.

    Per group: the valid points in float32, ``faiss.Kmeans(D, k, niter=iters, nredo=n_init, seed=seed,
    init_method=k-means++)`` on all of them (``points_per_centroid``: faiss's subsample of that many
    points per centre instead, e.g. its default 256; faster, slightly higher inertia), the restart of
    lowest objective kept. A group with at most ``k`` distinct valid points gets exactly its distinct
    points as centres (``deficient`` when fewer than ``k``); a group without valid points or with
    ``k = 0`` none. Identical input and seed give identical centres.

    Args:
        x: points ``(G, N, D)``, any float dtype and device (read group by group in float32 on the CPU).
        valid: ``(G, N)`` bool, the points of each group (e.g. the filled bank slots).
        k: ``(G,)`` long, centres per group (may differ; 0 gives no centre).
        k_max: width of the padded result (default ``max(k)``; must be ``>= max(k)``).
        iters: Lloyd iterations. seed: faiss seed. n_init: restarts (faiss ``nredo``).
        points_per_centroid: faiss ``max_points_per_centroid``; ``None`` uses every point.

    Returns:
        :class:`KMeansResult` on ``x``'s device; labels and inertia from one final assignment of
        every valid point (float64 distances).

    Example:
        >>> x = torch.tensor([[[0.0], [0.2], [10.0], [10.2]]])
        >>> res = kmeans(x, torch.ones(1, 4, dtype=torch.bool), torch.tensor([2]))
        >>> sorted(round(c, 4) for c in res.centers[0].flatten().tolist()), round(res.inertia.item(), 4)
        ([0.1, 10.1], 0.04)
    """
    k_max = _check(x, valid, k, k_max, "kmeans")
    if n_init < 1 or iters < 0:
        raise ValueError(f"n_init={n_init}, iters={iters}; expected n_init >= 1, iters >= 0")
    g, n, d = x.shape
    valid = valid.to(device=x.device, dtype=torch.bool)
    k_cpu = k.detach().cpu().long().clamp_min(0)
    centers_of: list[Tensor | None] = []
    for gi in range(g):
        kg = int(k_cpu[gi])
        rows = valid[gi].nonzero().squeeze(1)
        if kg == 0 or rows.numel() == 0:
            centers_of.append(None)
            continue
        data = x[gi].index_select(0, rows).float().cpu().contiguous()
        if rows.numel() <= 4 * kg:  # few points: maybe fewer distinct ones than k
            distinct = torch.unique(data, dim=0)
            if distinct.shape[0] <= kg:
                centers_of.append(distinct)
                continue
        km = faiss.Kmeans(
            d, kg, niter=int(iters), nredo=int(n_init), seed=int(seed), verbose=False,
            init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
            max_points_per_centroid=int(points_per_centroid) if points_per_centroid else max(1, data.shape[0]),
            min_points_per_centroid=1,
        )
        km.train(np.ascontiguousarray(data.numpy()))
        centers_of.append(torch.from_numpy(np.array(km.centroids, dtype=np.float32, copy=True)))
    return _finish(x, valid, k_cpu, k_max, centers_of, int(iters))


def random_centers(
    x: Tensor, valid: Tensor, k: Tensor, *, k_max: int | None = None, seed: int = 0
) -> KMeansResult:
    """Random prototypes (paper Fig. 7, "CPG vs random"): ``k[g]`` distinct valid points of each group
    drawn uniformly without replacement (keys from a CPU ``torch.Generator`` seeded by ``seed``, so
    every device and rank draws the same), no clustering.

    Same arguments and result as :func:`kmeans`: labels and inertia are those of one assignment of the
    valid points to the drawn centres; ``n_iter`` is 0; a group with fewer valid points than ``k``
    gets all of them (``deficient``).

    Example:
        >>> x = torch.arange(6.0).view(1, 6, 1)
        >>> res = random_centers(x, torch.ones(1, 6, dtype=torch.bool), torch.tensor([2]), seed=0)
        >>> int(res.center_mask.sum()), all(c in x.flatten().tolist() for c in res.centers.flatten().tolist())
        (2, True)
    """
    k_max = _check(x, valid, k, k_max, "random_centers")
    g, n, _ = x.shape
    valid = valid.to(device=x.device, dtype=torch.bool)
    k_cpu = k.detach().cpu().long().clamp_min(0)
    centers_of: list[Tensor | None] = [None] * g
    if g > 0 and n > 0 and k_max > 0:
        keys = torch.rand(g, n, generator=torch.Generator().manual_seed(int(seed)))
        top, idx = keys.masked_fill(~valid.cpu(), -1.0).topk(min(k_max, n), dim=1)  # distinct, valid first
        for gi in range(g):
            take = idx[gi][(top[gi] >= 0)][: int(k_cpu[gi])]
            if take.numel() > 0:
                centers_of[gi] = x[gi].index_select(0, take.to(x.device)).float().cpu()
    return _finish(x, valid, k_cpu, k_max, centers_of, 0)
