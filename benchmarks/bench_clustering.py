"""CPG clustering at paper scale: ``kmeans`` (faiss, every point) vs faiss's subsample and scikit-learn.

The official implementation clusters each (class, bank) with scikit-learn's ``MiniBatchKMeans``
one group after the other; faiss (``faiss.Kmeans``) is the library the field uses at this scale and what
``brpg.clustering.kmeans`` now wraps (it replaced a hand-written batched K-Means that was slower on bank-like
data; see ``brpg/clustering.py``). All
cluster the SAME data in the same run, two data sets: ``blobs`` (below) and ``bank-like`` (7 classes x 2
banks partly filled as at ``T_S2`` in the default run, ReLU features of weakly separated centres: no
clear cluster structure, the regime of real banks). For ``blobs``: ``2 banks x C classes`` groups of ``V`` 256-d features with a
few Gaussian blobs each, stored in float16 as in the bank. scikit-learn gets the float32 numpy copy
made outside the timing; ``kmeans`` converts each group from the float16 bank inside the timing (faiss
only takes float32). Same budget: 50 Lloyd iterations, 3 restarts (``n_init`` / ``nredo``) keeping the
best, k-means++ seeding, the same ``k`` per group, seed 0, the same threads. faiss runs twice: on
every point of a group (``kmeans``' default, the like-for-like row) and with faiss's default
subsample of 256 points per centre (``brpg.kmeans_points_per_centroid=256``). Inertia of every centre
set is computed the same way (float64, nearest centre) and averaged over groups.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

from benchmarks.common import fmt_times, ratio_line, time_interleaved
from brpg_lightning.brpg.clustering import kmeans


def make_groups(groups: int, n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``(groups, n, dim)`` float16: per group 3-5 blobs of unequal size and spread around random centres."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(groups, n, dim, dtype=torch.float16)
    for g in range(groups):
        blobs = int(torch.randint(3, 6, (1,), generator=gen))
        centres = torch.randn(blobs, dim, generator=gen) * 1.5
        share = torch.rand(blobs, generator=gen) + 0.3
        member = torch.multinomial(share / share.sum(), n, replacement=True, generator=gen)
        spread = 0.5 + torch.rand(blobs, 1, generator=gen)
        out[g] = (centres[member] + spread[member] * torch.randn(n, dim, generator=gen)).half()
    return out


BANK_FILL = (30000, 12000, 9000, 7000, 5000, 3000, 2000, 30000, 8000, 6000, 4000, 3000, 1500, 800)
"""Fill of the 2 x 7 banks in the bank-like set (a frequent background class full, rare classes short)."""


def make_bank_like(n: int, dim: int, fills: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(len(fills), n, dim)`` float16 and validity: ReLU of 4 weakly separated centres (0.6 sd apart
    per dimension) plus unit noise, the first ``fill`` slots of each group valid (a ring buffer)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(fills), n, dim, dtype=torch.float16)
    valid = torch.zeros(len(fills), n, dtype=torch.bool)
    for g, fill in enumerate(fills):
        centres = torch.randn(4, dim, generator=gen) * 0.6
        member = torch.randint(0, 4, (fill,), generator=gen)
        x[g, :fill] = (centres[member] + torch.randn(fill, dim, generator=gen)).relu().half()
        valid[g, :fill] = True
    return x, valid


def apo_like_k(classes: int, banks: int = 2, n0: int = 2) -> torch.Tensor:
    """``n0`` per group, ``n0 + 1`` for the 5 % of classes (at least one) per bank, as APO gives."""
    k = torch.full((banks, classes), n0, dtype=torch.long)
    extra = max(1, round(0.05 * classes))
    for b in range(banks):
        k[b, torch.randperm(classes, generator=torch.Generator().manual_seed(b))[:extra]] += 1
    return k.flatten()


def inertia(x: np.ndarray, centres: np.ndarray) -> float:
    """Sum over points of the squared distance to the nearest centre, float64."""
    x = x.astype(np.float64)
    c = centres.astype(np.float64)
    d2 = (x * x).sum(1, keepdims=True) - 2 * x @ c.T + (c * c).sum(1)[None]
    return float(np.clip(d2, 0, None).min(1).sum())


Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[np.ndarray]]


def compare(
    title: str, x: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, repeat: int, warmup: int,
    extra: dict[str, tuple[str, Method]] | None = None,
) -> list[str]:
    """Time and mean inertia of every method on the same groups; ratios against ``kmeans``."""
    x_np = [x[g][valid[g]].float().numpy() for g in range(x.shape[0])]  # the same data for scikit-learn
    faiss.omp_set_num_threads(torch.get_num_threads())

    def ours(points_per_centroid: int | None) -> Method:
        def fn(x: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> list[np.ndarray]:
            res = kmeans(x, valid, k, iters=50, seed=0, n_init=3, points_per_centroid=points_per_centroid)
            return [res.centers[g, : int(k[g])].numpy() for g in range(x.shape[0])]
        return fn

    def sklearn(x: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> list[np.ndarray]:
        return [MiniBatchKMeans(n_clusters=int(k[g]), random_state=0).fit(data).cluster_centers_
                for g, data in enumerate(x_np)]

    methods: dict[str, tuple[str, Method]] = {
        "kmeans": ("brpg kmeans = faiss.Kmeans per group, every point (niter=50, nredo=3, k-means++)", ours(None)),
        "faiss_sub": ("faiss.Kmeans, its default subsample 256 points/centre (niter=50, nredo=3)", ours(256)),
        "sklearn": ("sklearn MiniBatchKMeans per group (random_state=0; the official code)", sklearn),
        **(extra or {}),
    }
    centres: dict[str, list[np.ndarray]] = {}

    def runner(name: str) -> Callable[[], None]:
        return lambda: centres.__setitem__(name, methods[name][1](x, valid, k))

    timed = time_interleaved({name: runner(name) for name in methods}, repeat=repeat, warmup=warmup)
    groups = range(x.shape[0])
    inertias = {name: [inertia(x_np[g], centres[name][g]) for g in groups] for name in methods}
    counts = sorted(k.tolist())
    lines = [
        f"-- {title}: {x.shape[0]} groups x up to {x.shape[1]} x {x.shape[2]} float16 "
        f"({int(valid.sum())} points), k per group {counts.count(2)} x 2 + {counts.count(3)} x 3; "
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} faiss threads",
    ]
    for name, (label, _) in methods.items():
        med, times = timed[name]
        lines.append(f"{name:>11s}: {label}: median {med:.2f} s {fmt_times(times)}, "
                     f"mean inertia {np.mean(inertias[name]):.6g}")
    t_ours = timed["kmeans"][0]
    for other in [m for m in methods if m != "kmeans"]:
        speed = timed[other][0] / t_ours
        quality = float(np.mean(inertias["kmeans"]) / np.mean(inertias[other]))
        lines.append(ratio_line(f"{title}: time {other}/kmeans", speed, "> 1, kmeans faster", speed > 1))
        lines.append(ratio_line(f"{title}: mean inertia kmeans/{other}", quality, "<= 1.0", quality <= 1.0))
    return lines


def run(quick: bool, extra: dict[str, tuple[str, Method]] | None = None) -> list[str]:
    classes, n, dim = (5, 5000, 256) if quick else (21, 30000, 256)
    x = make_groups(2 * classes, n, dim)
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    lines = compare("blobs", x, valid, apo_like_k(classes), repeat=3, warmup=1, extra=extra)
    fills = tuple(max(50, f // 6) for f in BANK_FILL) if quick else BANK_FILL
    xb, vb = make_bank_like(max(fills), dim, fills)
    lines += compare("bank-like", xb, vb, apo_like_k(7), repeat=1 if not quick else 1, warmup=0, extra=extra)
    return lines
