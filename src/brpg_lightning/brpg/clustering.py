"""Batched K-Means for CPG (paper Eq. 10): every (class, bank) group clustered at once.

``R_c = {Cluster(Memory_h,c, N_h,c), Cluster(Memory_lw,c, N_lw,c)}``: groups are the rows of a padded
``(G, N, D)`` tensor (``G`` = banks x classes, ``N`` = bank capacity ``V``) with a validity mask and a
per-group number of centres (APO may add one, Eq. 12). Greedy k-means++ seeding (as scikit-learn) of
``n_init`` runs on a random subset of each full group, Lloyd iterations there, then Lloyd on all
points from the best run; everything vectorised over groups on ``x``'s device and read by chunks of
``N`` into a small float32 buffer (the banks stay in their 16-bit storage).

Why hand-written rather than faiss or scikit-learn (issue 8): ``python -m benchmarks --only clustering``,
under the shared lock on 2 CPU cores, clusters the same 42 groups (2 banks x 21 classes x 30000 x 256,
float16, k 2-3 per group, at most 50 Lloyd iterations, 3 restarts, k-means++, seed 0) with each:

=========================================================  ==============  =================
method                                                     median time     mean inertia
=========================================================  ==============  =================
this ``kmeans`` (batched; n_init=3, init_size=4096)        1.79 s          1.44907e+07
faiss 1.15.1 ``Kmeans`` per group, all points (nredo=3)    16.90 s         1.45381e+07
faiss ``Kmeans``, its default subsample 256 points/centre  0.53 s          1.45614e+07
scikit-learn ``MiniBatchKMeans`` per group                 3.34 s          1.47721e+07
=========================================================  ==============  =================

faiss is faster only on its default subsample, and then 0.5 % worse in inertia; on the same points it is
9.5x slower (it runs every iteration; this one stops at scikit-learn's tolerance). This one has the
lowest inertia, runs on the banks' own device and dtype (no float32 host copy per group, GPU too), and is
seeded from a CPU generator so every rank computes the same centres. Clustering runs once per run (at
``T_S2``), so 0.5-2 s do not matter against the epochs; inertia does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

_ZERO_REL = 1e-6
"""Squared distances below ``_ZERO_REL * (||x||^2 + ||c||^2)`` are float32 cancellation noise of the
expansion ``||x||^2 - 2 x.c + ||c||^2`` and count as 0 (a point equal to a centre)."""

INDEX_ADD_DEVICES = frozenset({"cpu"})
"""Device types whose M-step sums use ``index_add_`` (fast there); elsewhere a one-hot ``bmm``
(deterministic, where ``index_add_`` uses atomics)."""

CHUNK_ELEMS = {"cpu": 2**20, "cuda": 2**27}
"""float32 elements of ``x`` converted at once, by device type (4 MiB: cache-sized on the CPU;
512 MiB on a GPU, where fewer, larger kernels win); other devices use the CUDA value."""


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans` for ``G`` groups of ``N`` points in ``D`` dimensions.

    Attributes:
        centers: ``(G, K_max, D)`` float32; rows where ``center_mask`` is False are zero.
        center_mask: ``(G, K_max)`` bool, True on real centres.
        inertia: ``(G,)`` float32, sum over valid points of the squared distance to the nearest centre
            (scikit-learn's ``inertia_``); 0 for a group without centres.
        labels: ``(G, N)`` long, nearest centre of each valid point; -1 on invalid points.
        n_iter: Lloyd centre updates of the longest run (both stages summed).
        deficient: ``(G,)`` bool, groups that got fewer centres than asked (fewer distinct valid points
            than ``k``; all of their distinct points are centres).
    """

    centers: Tensor
    center_mask: Tensor
    inertia: Tensor
    labels: Tensor
    n_iter: int
    deficient: Tensor


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


class _Groups:
    """The groups ``ids`` of the data: ``x (G', N, D)`` in storage dtype, ``valid``, squared norms ``xx``
    (or None: computed per chunk while it is in cache) and chunks.

    Few groups are copied out (``index_select``); more than half are read in place (all ``G`` groups,
    the caller ignoring the others), which is cheaper than copying most of ``x``."""

    def __init__(self, x: Tensor, valid: Tensor, xx: Tensor | None, ids: Tensor, budget: int) -> None:
        g = x.shape[0]
        if ids.numel() > g // 2:
            ids = torch.arange(g, device=x.device)
            self.x, self.valid, self.xx = x, valid, xx
        else:
            self.x, self.valid = x.index_select(0, ids), valid.index_select(0, ids)
            self.xx = None if xx is None else xx.index_select(0, ids)
        self.ids = ids
        self.chunks = Float32Chunks(self.x, self.valid, budget)

    def norms(self, start: int, end: int, xc: Tensor) -> Tensor:
        """``||x||^2`` of the chunk ``xc = x[:, start:end]`` (float32, 0 on invalid points)."""
        if self.xx is not None:
            return self.xx[:, start:end]
        return torch.linalg.vector_norm(xc, dim=2).square()


def _sq_dist(xc: Tensor, xxc: Tensor, c: Tensor, cc: Tensor) -> Tensor:
    """Squared distances ``(G, n, K)`` between ``xc (G, n, D)`` and ``c (G, K, D)`` via
    ``||x||^2 - 2 x c^T + ||c||^2``, clamped at 0 and with cancellation noise set to 0."""
    scale = xxc.unsqueeze(2) + cc.unsqueeze(1)
    d2 = torch.baddbmm(scale, xc, c.transpose(1, 2), beta=1.0, alpha=-2.0)
    return d2.masked_fill_(d2 <= _ZERO_REL * scale, 0.0)


def _draw(weights: Tensor, num: int, generator: torch.Generator) -> Tensor:
    """``num`` indices per row of ``weights (G, N) >= 0`` drawn with probability ``weights / sum``
    (inverse CDF, with replacement); uniforms from the CPU ``generator`` so every device and rank
    draws the same. Rows of zero weight return the index of their largest weight (unused)."""
    g, n = weights.shape
    cum = weights.double().cumsum(1)
    u = torch.rand(g, num, generator=generator, dtype=torch.float64).to(weights.device) * cum[:, -1:]
    idx = torch.searchsorted(cum, u, right=True).clamp_max(n - 1)
    bad = weights.gather(1, idx) <= 0  # only by float rounding at the top end
    return torch.where(bad, weights.argmax(1, keepdim=True).expand_as(idx), idx)


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``x[g, idx[g, t]]`` of ``x (G, N, D)`` -> ``(G, T, D)`` in x's dtype (one ``index_select``
    on the flattened rows, several times faster than ``gather`` with an expanded index)."""
    g, n, d = x.shape
    flat = idx + torch.arange(g, device=idx.device).unsqueeze(1) * n
    return x.reshape(g * n, d).index_select(0, flat.reshape(-1)).view(g, -1, d)


def _rows(x: Tensor, valid: Tensor, idx: Tensor) -> Tensor:
    """Rows ``x[g, idx[g, t]]`` as float32 ``(G, T, D)``, zero where the row is not valid."""
    rows = _take(x, idx).float()
    ok = valid.gather(1, idx).unsqueeze(2)
    return torch.where(ok, rows, rows.new_zeros(()))


def _pairwise(grp: _Groups, c: Tensor) -> Tensor:
    """Squared distances ``(G', N, T)`` of every point of the groups to ``c (G', T, D)``."""
    cc = (c * c).sum(2)
    return torch.cat([_sq_dist(xc, grp.norms(s, e, xc), c, cc) for s, e, xc in grp.chunks], dim=1)


def _kmeans_pp(
    x: Tensor,
    valid: Tensor,
    xx: Tensor | None,
    k: Tensor,
    k_max: int,
    n_init: int,
    generator: torch.Generator,
    budget: int,
) -> tuple[Tensor, Tensor]:
    """Greedy k-means++ seeding of ``n_init`` independent runs per group (scikit-learn's
    ``_kmeans_plusplus``: D^2 sampling of ``2 + floor(ln K_max)`` candidates per step, the one lowering
    the potential most is kept). A run stops adding centres at its group's ``k`` or when every valid
    point coincides with a centre (no distinct point left). The random draws do not depend on which
    groups are still seeding. Returns ``centers (G, R, K, D)`` float32 and ``cmask (G, R, K)`` bool."""
    g, n, d = x.shape
    r = n_init
    centers = torch.zeros(g, r, k_max, d, device=x.device)
    cmask = torch.zeros(g, r, k_max, dtype=torch.bool, device=x.device)
    weights = valid.float()  # (G, N)
    first = _draw(weights.repeat_interleave(r, 0), 1, generator).view(g, r)  # uniform among valid points
    on = ((weights.sum(1) > 0) & (k > 0)).view(g, 1).expand(g, r)
    c0 = torch.where(on.unsqueeze(2), _rows(x, valid, first), 0.0)  # (G, R, D)
    centers[:, :, 0], cmask[:, :, 0] = c0, on
    everyone = _Groups(x, valid, xx, torch.arange(g, device=x.device), budget)
    closest = _pairwise(everyone, c0).transpose(1, 2) * weights.unsqueeze(1)  # (G, R, N) potential per point
    trials = 2 + int(math.log(k_max))
    for j in range(1, k_max):
        active = cmask[:, :, j - 1] & (k > j).unsqueeze(1) & (closest.sum(2) > 0)  # (G, R)
        pool = torch.where(active.unsqueeze(2), closest, weights.unsqueeze(1)).reshape(g * r, n)
        cand_idx = _draw(pool, trials, generator).view(g, r * trials)
        ids = active.any(1).nonzero().squeeze(1)
        if ids.numel() == 0:
            break
        grp = _Groups(x, valid, xx, ids, budget)
        ids = grp.ids
        gs = ids.numel()
        cand = _rows(grp.x, grp.valid, cand_idx[ids])  # (G', R*T, D)
        d_cand = _pairwise(grp, cand).view(gs, n, r, trials).permute(0, 2, 3, 1)  # (G', R, T, N)
        near, w = closest[ids], weights[ids].view(gs, 1, 1, n)  # (G', R, N)
        pot = (torch.minimum(near.unsqueeze(2), d_cand) * w).sum(3)  # (G', R, T)
        pick = pot.argmin(2).view(gs, r, 1, 1)
        new_center = cand.view(gs, r, trials, d).gather(2, pick.expand(-1, -1, 1, d)).squeeze(2)
        new_near = torch.minimum(near, d_cand.gather(2, pick.expand(-1, -1, 1, n)).squeeze(2)) * w.view(
            gs, 1, n
        )
        on = active[ids]
        centers[ids, :, j] = torch.where(on.unsqueeze(2), new_center, 0.0)
        cmask[ids, :, j] = on
        closest[ids] = torch.where(on.unsqueeze(2), new_near, near)
    return centers, cmask


def _assign(
    grp: _Groups, centers: Tensor, cmask: Tensor, with_sums: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """E-step (and M-step statistics) of ``R`` runs at once, one pass over the points of ``grp``.

    ``centers (G', R, K, D)``, ``cmask (G', R, K)`` -> labels ``(G', R, N)``, squared distance to the
    nearest centre ``(G', R, N)``, and when ``with_sums`` the per-centre sums ``(G', R, K, D)`` and
    counts ``(G', R, K)`` over valid points (``index_add`` on the CPU; a one-hot ``bmm`` elsewhere,
    which is deterministic on GPUs)."""
    g, r, k_max, d = centers.shape
    n = grp.valid.shape[1]
    device = centers.device
    flat = centers.reshape(g, r * k_max, d)
    cc = (flat * flat).sum(2)
    labels = torch.empty(g, r, n, dtype=torch.long, device=device)
    dmin = torch.empty(g, r, n, dtype=torch.float32, device=device)
    sums = centers.new_zeros(g * r * k_max, d) if with_sums else None
    counts = centers.new_zeros(g * r * k_max) if with_sums else None
    off = ~cmask.reshape(g, 1, r * k_max)
    run_offset = (torch.arange(r, device=device) * k_max).view(1, 1, r)
    group_offset = (torch.arange(g, device=device) * (r * k_max)).view(g, 1, 1)
    use_index_add = device.type in INDEX_ADD_DEVICES
    for s, e, xc in grp.chunks:
        d2 = _sq_dist(xc, grp.norms(s, e, xc), flat, cc).masked_fill_(off, math.inf)
        best_d, best = d2.view(g, e - s, r, k_max).min(3)  # (G', n, R)
        labels[:, :, s:e], dmin[:, :, s:e] = best.transpose(1, 2), best_d.transpose(1, 2)
        if not with_sums:
            continue
        hit = grp.valid[:, s:e].float()  # invalid rows of xc are zero: only their count must be skipped
        if use_index_add:
            slot = best + run_offset + group_offset  # (G', n, R) rows of sums
            rows = xc.reshape(-1, d)
            for run in range(r):
                sums.index_add_(0, slot[:, :, run].reshape(-1), rows)
                counts.index_add_(0, slot[:, :, run].reshape(-1), hit.reshape(-1))
        else:
            onehot = torch.zeros(g, e - s, r * k_max, device=device)
            onehot.scatter_(2, best + run_offset, hit.unsqueeze(2).expand(-1, -1, r))
            sums.view(g, r * k_max, d).baddbmm_(onehot.transpose(1, 2), xc)
            counts.view(g, r * k_max).add_(onehot.sum(1))
    if with_sums:
        sums, counts = sums.view(g, r, k_max, d), counts.view(g, r, k_max)
    return labels, dmin, sums, counts


def _norms(x: Tensor, valid: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """One pass: squared norms ``xx (G, N)`` (0 on invalid points) and per-group sums ``(G, D)``."""
    g, n, d = x.shape
    xx = torch.empty(g, n, device=x.device)
    total = torch.zeros(g, d, device=x.device)
    for s, e, xc in Float32Chunks(x, valid, budget):
        xx[:, s:e] = torch.linalg.vector_norm(xc, dim=2).square()
        total += xc.sum(1)
    return xx, total


def _tolerance(xx: Tensor, total: Tensor, valid: Tensor, tol: float) -> Tensor:
    """``tol * mean_d Var(x_d)`` over each group's valid points, ``(G,)`` (scikit-learn's ``_tolerance``)."""
    n_valid = valid.sum(1).clamp_min(1).float()
    mean_var = ((xx.sum(1) / n_valid) - ((total / n_valid.unsqueeze(1)) ** 2).sum(1)).clamp_min(0)
    return tol * mean_var / total.shape[1]


def _lloyd(
    x: Tensor,
    valid: Tensor,
    xx: Tensor | None,
    centers: Tensor,
    cmask: Tensor,
    tol_g: Tensor,
    iters: int,
    budget: int,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Lloyd iterations of ``R`` runs per group from ``centers (G, R, K, D)`` (masked by ``cmask``).

    Each iteration assigns the points (E-step) and computes the means (M-step). A run whose squared
    centre shift summed over centres is ``<= tol_g`` (per group) has converged: it keeps the centres
    of that last assignment (within ``tol`` of their means), so that centres, labels and distances
    agree without a further pass; after ``iters`` updates a last assignment is made.

    Returns:
        ``centers (G, R, K, D)``, ``labels (G, R, N)``, squared distances to them ``(G, R, N)`` and
        the number of centre updates of the longest run.
    """
    g, r, k_max, _ = centers.shape
    n = x.shape[1]
    centers = centers.clone()
    labels = torch.zeros(g, r, n, dtype=torch.long, device=x.device)
    dist = torch.zeros(g, r, n, device=x.device)
    active = cmask.any(2)  # (G, R) runs not yet converged
    n_iter = 0
    grp = None
    for it in range(iters + 1):
        ids = active.any(1).nonzero().squeeze(1)
        if ids.numel() == 0:
            break
        if grp is None or not (ids.numel() == grp.ids.numel() and bool((ids == grp.ids).all())):
            grp = _Groups(x, valid, xx, ids, budget)  # copied out again only when the active set changes
        ids = grp.ids
        old, m, moving = centers[ids], cmask[ids], active[ids]
        lab, dmin, sums, counts = _assign(grp, old, m, with_sums=it < iters)
        keep = moving.unsqueeze(2)
        labels[ids] = torch.where(keep, lab, labels[ids])
        dist[ids] = torch.where(keep, dmin, dist[ids])
        if it == iters:
            break
        new = torch.where((counts > 0).unsqueeze(3), sums / counts.clamp_min(1).unsqueeze(3), old)
        empty = m & (counts == 0)
        if bool(empty.any()):
            # farthest valid points of each run, the j-th farthest for its j-th empty centre
            far = dmin.masked_fill(~grp.valid.unsqueeze(1), -1.0).topk(min(k_max, n), dim=2).indices
            order = (empty.long().cumsum(2) - 1).clamp(0, far.shape[2] - 1)
            point = far.gather(2, order)  # (G', R, K)
            repl = _rows(grp.x, grp.valid, point.flatten(1)).view_as(new)
            new = torch.where(empty.unsqueeze(3), repl, new)
        new = new.masked_fill(~m.unsqueeze(3), 0.0)
        shift = ((new - old) ** 2).sum(3).sum(2)  # (G', R)
        update = moving & (shift > tol_g[ids].unsqueeze(1))
        centers[ids] = torch.where(update.view(*update.shape, 1, 1), new, old)
        active[ids] = update
        n_iter += int(bool(update.any()))
    return centers, labels, dist, n_iter


def _best_run(
    valid: Tensor, centers: Tensor, cmask: Tensor, labels: Tensor, dist: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each group the run of lowest inertia (the first on ties): ``centers (G, K, D)``,
    ``cmask (G, K)``, ``labels (G, N)`` (-1 off valid points) and ``inertia (G,)``."""
    g = centers.shape[0]
    has_center = cmask.any(2)  # (G, R)
    inertia = torch.where(valid.unsqueeze(1) & has_center.unsqueeze(2), dist, 0.0).sum(2)  # (G, R)
    best = inertia.argmin(1)
    rows = torch.arange(g, device=centers.device)
    centers, cmask, labels = centers[rows, best], cmask[rows, best], labels[rows, best]
    labels = labels.masked_fill(~valid | ~cmask.any(1, keepdim=True), -1)
    return centers, cmask, labels, inertia[rows, best]


def kmeans(
    x: Tensor,
    valid: Tensor,
    k: Tensor,
    *,
    k_max: int | None = None,
    iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    n_init: int = 3,
    init_size: int = 4096,
    chunk_elems: int | None = None,
) -> KMeansResult:
    """K-Means of ``G`` groups at once (CPG's ``Cluster(Memory_{alpha,c}, N_{alpha,c})``, Eq. 10).

    Seeding: greedy k-means++ with a ``torch.Generator`` seeded by ``seed`` on the CPU (identical
    centres on every call, device and rank for identical input). Then Lloyd: assign each valid point to
    its nearest centre (``||x||^2 - 2 x c^T + ||c||^2``, clamped >= 0), move each centre to the mean of
    its points (sum over the ``n_{g,k}`` assigned points divided by ``n_{g,k}``), until a run's squared
    centre shift summed over its centres is ``<= tol * mean_d Var(x_d)`` (scikit-learn's relative
    tolerance; that run then stops, as if clustered alone) or ``iters`` iterations. A centre left
    without points is moved to the valid point farthest from its centre (the 2nd farthest for a 2nd
    empty centre, ...), never NaN. A converged run keeps the centres of its last assignment (within
    ``tol`` of their means), so centres, labels and inertia agree without a further pass.

    ``n_init`` runs per group (scikit-learn's ``n_init``; the one of lowest inertia is kept) share
    every pass over the data. When the groups span more than ``init_size`` slots (full banks; slots
    past every group's last valid point are dropped first), the runs are seeded and iterated on a
    uniform random subset of up to ``init_size`` valid points per group (as ``MiniBatchKMeans``'
    ``init_size``), the best one is kept and Lloyd then continues on all points from its centres: most
    passes touch ``init_size`` rows instead of ``N``. A group whose subset has fewer distinct points
    than ``k`` (and more points outside it) is seeded on all its points instead.

    Args:
        x: points ``(G, N, D)``, any float dtype (read in float32 by chunks of ``N``).
        valid: ``(G, N)`` bool, the points of each group (e.g. the filled bank slots).
        k: ``(G,)`` long, centres per group (may differ; 0 gives no centre).
        k_max: width of the padded result (default ``max(k)``; must be ``>= max(k)``).
        iters: maximum Lloyd iterations (per stage). tol: relative tolerance. seed: k-means++ seed.
        n_init: independent seedings per group (the best one is kept).
        init_size: points per group of the seeding stage (all when ``N <= init_size``).
        chunk_elems: float32 elements of ``x`` converted at once (default :data:`CHUNK_ELEMS`).

    Returns:
        :class:`KMeansResult` (``n_iter`` counts the centre updates of both stages). A group with
        fewer distinct valid points than ``k`` gets exactly its distinct points as centres (the rest
        masked, ``deficient`` True); one without valid points none.

    Example:
        >>> x = torch.tensor([[[0.0], [0.2], [10.0], [10.2]]])
        >>> res = kmeans(x, torch.ones(1, 4, dtype=torch.bool), torch.tensor([2]))
        >>> sorted(res.centers[0].flatten().tolist()), round(res.inertia.item(), 4)
        ([0.10000000149011612, 10.100000381469727], 0.04)
    """
    if x.ndim != 3 or valid.shape != x.shape[:2] or k.shape != x.shape[:1]:
        raise ValueError(
            f"kmeans expects x (G, N, D), valid (G, N), k (G,); got {tuple(x.shape)}, {tuple(valid.shape)}, "
            f"{tuple(k.shape)}"
        )
    if n_init < 1 or init_size < 1:
        raise ValueError(f"n_init={n_init}, init_size={init_size}; expected >= 1")
    g, n, d = x.shape
    valid_shape = valid.shape
    device = x.device
    valid = valid.to(device=device, dtype=torch.bool)
    k = k.to(device=device, dtype=torch.long).clamp_min(0)
    k_top = int(k.max()) if g > 0 else 0
    k_max = k_top if k_max is None else int(k_max)
    if k_max < k_top:
        raise ValueError(f"k_max={k_max} is smaller than max(k)={k_top}")
    # columns past the last valid point of every group (a partly filled bank) are never read
    filled = valid.any(0).nonzero()
    n_used = int(filled.max()) + 1 if filled.numel() > 0 else 0
    if g == 0 or n_used == 0 or k_max == 0:
        return KMeansResult(
            centers=torch.zeros(g, k_max, d, device=device),
            center_mask=torch.zeros(g, k_max, dtype=torch.bool, device=device),
            inertia=torch.zeros(g, device=device),
            labels=torch.full((g, n), -1, dtype=torch.long, device=device),
            n_iter=0,
            deficient=k > 0,
        )
    x, valid, n = x[:, :n_used], valid[:, :n_used], n_used
    budget = chunk_elems if chunk_elems is not None else CHUNK_ELEMS.get(device.type, CHUNK_ELEMS["cuda"])
    generator = torch.Generator().manual_seed(int(seed))
    if n <= init_size:  # one stage: every run on all points
        xx, total = _norms(x, valid, budget)
        tol_g = _tolerance(xx, total, valid, tol)
        centers, cmask = _kmeans_pp(x, valid, xx, k, k_max, n_init, generator, budget)
        centers, labels, dist, n_iter = _lloyd(x, valid, xx, centers, cmask, tol_g, iters, budget)
    else:
        # stage 1: runs on a uniform random subset of init_size valid points per group
        keys = torch.rand(g, n, generator=generator).to(device).masked_fill(~valid, -1.0)
        top, idx = keys.topk(init_size, dim=1)
        sub_valid = top >= 0
        sub_x = _take(x, idx)
        sub_xx, sub_total = _norms(sub_x, sub_valid, budget)
        tol_g = _tolerance(sub_xx, sub_total, sub_valid, tol)  # the subset's variance sets the tolerance
        sub_c, sub_m = _kmeans_pp(sub_x, sub_valid, sub_xx, k, k_max, n_init, generator, budget)
        sub_c, sub_labels, sub_dist, n_sub = _lloyd(
            sub_x, sub_valid, sub_xx, sub_c, sub_m, tol_g, iters, budget
        )
        start, start_mask, _, _ = _best_run(sub_valid, sub_c, sub_m, sub_labels, sub_dist)
        # stage 2: the best run continues on all points (squared norms computed per chunk, in cache)
        xx = None
        # a subset may miss distinct points that the group has: seed those groups on all points
        short = ((start_mask.sum(1) < k) & (valid.sum(1) > sub_valid.sum(1))).nonzero().squeeze(1)
        if short.numel() > 0:
            again = torch.Generator().manual_seed(int(seed))
            full_c, full_m = _kmeans_pp(x[short], valid[short], None, k[short], k_max, 1, again, budget)
            start[short], start_mask[short] = full_c[:, 0], full_m[:, 0]
        cmask = start_mask.unsqueeze(1)
        centers, labels, dist, n_full = _lloyd(x, valid, xx, start.unsqueeze(1), cmask, tol_g, iters, budget)
        n_iter = n_sub + n_full
    centers, cmask, labels, inertia = _best_run(valid, centers, cmask, labels, dist)
    deficient = cmask.sum(1) < k
    if n_used < valid_shape[1]:
        labels = torch.cat([labels, labels.new_full((g, valid_shape[1] - n_used), -1)], dim=1)
    return KMeansResult(centers, cmask, inertia, labels, n_iter, deficient)


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
    if x.ndim != 3 or valid.shape != x.shape[:2] or k.shape != x.shape[:1]:
        raise ValueError(
            f"random_centers expects x (G, N, D), valid (G, N), k (G,); got {tuple(x.shape)}, "
            f"{tuple(valid.shape)}, {tuple(k.shape)}"
        )
    g, n, d = x.shape
    device = x.device
    valid = valid.to(device=device, dtype=torch.bool)
    k = k.to(device=device, dtype=torch.long).clamp_min(0)
    k_top = int(k.max()) if g > 0 else 0
    k_max = k_top if k_max is None else int(k_max)
    if k_max < k_top:
        raise ValueError(f"k_max={k_max} is smaller than max(k)={k_top}")
    centers = torch.zeros(g, k_max, d, device=device)
    cmask = torch.zeros(g, k_max, dtype=torch.bool, device=device)
    labels = torch.full((g, n), -1, dtype=torch.long, device=device)
    inertia = torch.zeros(g, device=device)
    if g == 0 or n == 0 or k_max == 0:
        return KMeansResult(centers, cmask, inertia, labels, 0, k > 0)
    keys = torch.rand(g, n, generator=torch.Generator().manual_seed(int(seed))).to(device)
    top, idx = keys.masked_fill(~valid, -1.0).topk(min(k_max, n), dim=1)  # distinct indices, valid first
    slot = torch.arange(top.shape[1], device=device).unsqueeze(0)
    take = (top >= 0) & (slot < k.unsqueeze(1))
    centers[:, : top.shape[1]] = torch.where(take.unsqueeze(2), _take(x, idx).float(), 0.0)
    cmask[:, : top.shape[1]] = take
    grp = _Groups(x, valid, None, torch.arange(g, device=device), CHUNK_ELEMS.get(device.type, CHUNK_ELEMS["cuda"]))
    lab, dmin, _, _ = _assign(grp, centers.unsqueeze(1), cmask.unsqueeze(1), with_sums=False)
    has = cmask.any(1, keepdim=True)
    labels = lab[:, 0].masked_fill(~valid | ~has, -1)
    inertia = torch.where(valid & has, dmin[:, 0], 0.0).sum(1)
    return KMeansResult(centers, cmask, inertia, labels, 0, cmask.sum(1) < k)
