"""CPG clustering at paper scale: batched ``kmeans`` vs a per-group MiniBatchKMeans loop.

The official implementation clusters each (class, bank) with scikit-learn's ``MiniBatchKMeans``
one group after the other. Here both cluster the SAME data: ``2 banks x C classes`` groups of ``V``
256-d features with a few Gaussian blobs each, stored in float16 as in the bank (scikit-learn gets
the float32 numpy copy, made outside the timing). Inertia of both centre sets is computed the same
way (float64, nearest centre) and averaged over groups.
"""

from __future__ import annotations

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

    timed = time_interleaved({"ours": ours, "theirs": theirs}, repeat=repeat)
    (t_ours, times_ours), (t_theirs, times_theirs) = timed["ours"], timed["theirs"]
    res = ours_result["res"]
    inertia_ours = [inertia(x_np[g], res.centers[g, : int(k[g])].numpy()) for g in range(len(x_np))]
    inertia_theirs = [inertia(x_np[g], theirs_centres[g]) for g in range(len(x_np))]
    per_group = np.array(inertia_ours) / np.array(inertia_theirs)
    speed = t_theirs / t_ours
    quality = float(np.mean(inertia_ours) / np.mean(inertia_theirs))
    return [
        f"data: {2 * classes} groups (2 banks x {classes} classes) x {n} x {dim} float16, "
        f"k per group {sorted(k.tolist()).count(2)} x 2 + {sorted(k.tolist()).count(3)} x 3",
        f"ours   batched kmeans (defaults: n_init=3, init_size=4096; {res.n_iter} Lloyd updates): "
        f"median {t_ours:.2f} s {fmt_times(times_ours)}",
        f"theirs MiniBatchKMeans per group loop (random_state=0): median {t_theirs:.2f} s "
        f"{fmt_times(times_theirs)}",
        f"mean inertia: ours {np.mean(inertia_ours):.6g}, theirs {np.mean(inertia_theirs):.6g}; "
        f"per-group ratio min {per_group.min():.4f} max {per_group.max():.4f}",
        ratio_line("time theirs/ours (speed-up)", speed, "> 1, ours faster", speed > 1),
        ratio_line("mean inertia ours/theirs", quality, "<= 1.0", quality <= 1.0),
    ]
