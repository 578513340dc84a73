"""CPG clustering at paper scale: batched ``kmeans`` vs faiss and scikit-learn, per-group loops.

The official implementation clusters each (class, bank) with scikit-learn's ``MiniBatchKMeans``
one group after the other; faiss (``faiss.Kmeans``) is the library the field uses at this scale. All
cluster the SAME data in the same run: ``2 banks x C classes`` groups of ``V`` 256-d features with a
few Gaussian blobs each, stored in float16 as in the bank. scikit-learn gets the float32 numpy copy
made outside the timing; faiss converts each group from the float16 bank inside the timing (it
only takes float32, and the callback would have to make that copy). Same budget for ours and faiss:
at most 50 Lloyd iterations, 3 restarts (``n_init`` / ``nredo``) keeping the best, k-means++ seeding,
the same ``k`` per group, seed 0, the same threads. faiss runs twice: on every point of a group
(``max_points_per_centroid`` = V, the like-for-like row) and with its default subsample of 256
points per centre. Inertia of every centre set is computed the same way (float64, nearest centre)
and averaged over groups.
"""

from __future__ import annotations

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


def run(quick: bool) -> list[str]:
    classes, n, dim = (5, 5000, 256) if quick else (21, 30000, 256)
    repeat = 3
    x = make_groups(2 * classes, n, dim)
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    k = apo_like_k(classes)
    x_np = [x[g].float().numpy() for g in range(x.shape[0])]  # the same data for scikit-learn

    ours_result: dict = {}

    def ours() -> None:
        ours_result["res"] = kmeans(x, valid, k, iters=50, seed=0)

    theirs_centres: list[np.ndarray] = []

    def theirs() -> None:
        theirs_centres.clear()
        for g, data in enumerate(x_np):
            theirs_centres.append(
                MiniBatchKMeans(n_clusters=int(k[g]), random_state=0).fit(data).cluster_centers_
            )

    faiss.omp_set_num_threads(torch.get_num_threads())
    faiss_centres: dict[str, list[np.ndarray]] = {"all": [], "sub": []}

    def faiss_loop(key: str, points_per_centroid: int | None) -> None:
        faiss_centres[key].clear()
        for g in range(x.shape[0]):
            data = np.ascontiguousarray(x[g].float().numpy())  # the float16 bank -> float32, timed
            km = faiss.Kmeans(
                dim, int(k[g]), niter=50, nredo=3, seed=0, verbose=False,
                init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
                max_points_per_centroid=points_per_centroid or n,
            )
            km.train(data)
            faiss_centres[key].append(km.centroids.copy())

    timed = time_interleaved(
        {
            "ours": ours,
            "faiss": lambda: faiss_loop("all", None),
            "faiss_sub": lambda: faiss_loop("sub", 256),
            "sklearn": theirs,
        },
        repeat=repeat,
    )
    res = ours_result["res"]
    groups = range(len(x_np))
    inertias = {
        "ours": [inertia(x_np[g], res.centers[g, : int(k[g])].numpy()) for g in groups],
        "faiss": [inertia(x_np[g], faiss_centres["all"][g]) for g in groups],
        "faiss_sub": [inertia(x_np[g], faiss_centres["sub"][g]) for g in groups],
        "sklearn": [inertia(x_np[g], theirs_centres[g]) for g in groups],
    }
    labels = {
        "ours": f"ours batched kmeans (n_init=3, init_size=4096, k-means++; {res.n_iter} Lloyd updates)",
        "faiss": "faiss.Kmeans per group, all points (niter=50, nredo=3, k-means++)",
        "faiss_sub": "faiss.Kmeans per group, default subsample 256/centre (niter=50, nredo=3, k-means++)",
        "sklearn": "sklearn MiniBatchKMeans per group (random_state=0)",
    }
    lines = [
        f"data: {2 * classes} groups (2 banks x {classes} classes) x {n} x {dim} float16, "
        f"k per group {sorted(k.tolist()).count(2)} x 2 + {sorted(k.tolist()).count(3)} x 3; "
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} faiss threads",
    ]
    for name, label in labels.items():
        med, times = timed[name]
        lines.append(f"{name:>9s}: {label}: median {med:.2f} s {fmt_times(times)}, "
                     f"mean inertia {np.mean(inertias[name]):.6g}")
    t_ours = timed["ours"][0]
    for other in ("faiss", "faiss_sub", "sklearn"):
        speed = timed[other][0] / t_ours
        quality = float(np.mean(inertias["ours"]) / np.mean(inertias[other]))
        per_group = np.array(inertias["ours"]) / np.array(inertias[other])
        lines.append(f"per-group inertia ratio ours/{other}: min {per_group.min():.4f} max {per_group.max():.4f}")
        lines.append(ratio_line(f"time {other}/ours (speed-up)", speed, "> 1, ours faster", speed > 1))
        lines.append(ratio_line(f"mean inertia ours/{other}", quality, "<= 1.0", quality <= 1.0))
    return lines
