"""K-Means of CPG (Eq. 10, faiss) against planted clusters, scikit-learn and Lloyd written out."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from brpg_lightning.brpg.clustering import kmeans


def _blobs(rng: np.random.Generator, n: int, d: int, k: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.uniform(-spread, spread, size=(k, d))
    member = rng.integers(0, k, n)
    return (centres[member] + rng.normal(size=(n, d))).astype(np.float32), member


def _reference_inertia(x: np.ndarray, centres: np.ndarray) -> float:
    """Sum of squared distances to the nearest centre, computed directly in float64."""
    d2 = ((x[:, None, :].astype(np.float64) - centres[None].astype(np.float64)) ** 2).sum(2)
    return float(d2.min(1).sum())


def test_recovers_planted_clusters_in_every_group() -> None:
    gen = torch.Generator().manual_seed(0)
    g, n, d, ks = 3, 300, 8, [2, 3, 4]
    truth = [torch.randn(k, d, generator=gen) * 20 for k in ks]  # far apart, unit noise
    member = [torch.randint(0, k, (n,), generator=gen) for k in ks]
    x = torch.stack([truth[i][member[i]] + torch.randn(n, d, generator=gen) for i in range(g)])
    res = kmeans(x, torch.ones(g, n, dtype=torch.bool), torch.tensor(ks))
    assert res.centers.shape == (g, 4, d) and res.center_mask.sum(1).tolist() == ks
    for i, k in enumerate(ks):
        got = res.centers[i, :k]
        match = torch.cdist(got, truth[i]).argmin(1)  # each found centre's planted centre
        assert sorted(match.tolist()) == list(range(k))
        assert torch.cdist(got, truth[i]).min(1).values.max() < 0.5  # ~ 1/sqrt(n/k) of the noise
        # labels = the planted partition, up to renaming
        pairs = {(int(a), int(b)) for a, b in zip(res.labels[i], member[i], strict=True)}
        assert len(pairs) == k
    assert not res.deficient.any()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_inertia_within_one_percent_of_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = [_blobs(rng, 500, 16, 3, 4.0)[0], _blobs(rng, 400, 4, 2, 3.0)[0], _blobs(rng, 450, 32, 3, 2.0)[0]]
    ks = [3, 2, 3]
    n_max = max(len(a) for a in data)
    x = torch.zeros(len(data), n_max, 32)
    valid = torch.zeros(len(data), n_max, dtype=torch.bool)
    for i, a in enumerate(data):
        x[i, : len(a), : a.shape[1]] = torch.from_numpy(a)
        valid[i, : len(a)] = True
    res = kmeans(x, valid, torch.tensor(ks), seed=seed)
    for i, (a, k) in enumerate(zip(data, ks, strict=True)):
        sk = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(a)
        ours = res.centers[i, :k, : a.shape[1]].numpy()
        assert res.inertia[i].item() == pytest.approx(_reference_inertia(a, ours), rel=1e-4)
        assert res.inertia[i].item() <= 1.01 * sk.inertia_


def test_mean_inertia_on_par_with_sklearn_on_unstructured_data() -> None:
    """Gaussian noise has many local optima: single runs of either differ; the mean must not."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(16, 300, 2)).astype(np.float32)
    res = kmeans(torch.from_numpy(data), torch.ones(16, 300, dtype=torch.bool), torch.full((16,), 3))
    sk = [KMeans(n_clusters=3, n_init=1, random_state=i).fit(a).inertia_ for i, a in enumerate(data)]
    assert res.inertia.mean().item() <= 1.01 * float(np.mean(sk))


def test_more_runs_lower_the_inertia() -> None:
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(16, 200, 2)).astype(np.float32))
    valid, k = torch.ones(16, 200, dtype=torch.bool), torch.full((16,), 4)
    one = kmeans(x, valid, k, n_init=1)
    five = kmeans(x, valid, k, n_init=5)
    assert five.inertia.mean() < one.inertia.mean()
    for i in range(16):  # the reported inertia is the returned centres' own
        d2 = torch.cdist(x[i].double(), five.centers[i].double()).pow(2).min(1).values.sum()
        assert five.inertia[i].item() == pytest.approx(d2.item(), rel=1e-4)


def test_deterministic_for_a_seed_and_seed_matters() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(4, 200, 5)).astype(np.float32))
    valid, k = torch.ones(4, 200, dtype=torch.bool), torch.tensor([2, 3, 2, 4])
    a, b = kmeans(x, valid, k, seed=7), kmeans(x, valid, k, seed=7)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels) and a.n_iter == b.n_iter
    c = kmeans(x, valid, k, seed=8, iters=0)  # seeding alone differs with the seed
    assert not torch.equal(c.centers, kmeans(x, valid, k, seed=7, iters=0).centers)


def test_storage_dtype_and_padding_do_not_change_the_result() -> None:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(3, 257, 6)).astype(np.float16))
    valid = torch.rand(3, 257, generator=torch.Generator().manual_seed(0)) < 0.8
    x[~valid] = torch.nan  # garbage in unused slots must not leak
    k = torch.tensor([2, 3, 3])
    whole = kmeans(x, valid, k)
    as_f32 = kmeans(x.float(), valid, k)
    for other in (as_f32,):
        torch.testing.assert_close(other.centers, whole.centers)
        assert torch.equal(other.labels, whole.labels)
    assert torch.isfinite(whole.centers).all() and torch.isfinite(whole.inertia).all()
    assert (whole.labels[~valid] == -1).all() and (whole.labels[valid] >= 0).all()


def test_deficient_groups_get_their_distinct_points() -> None:
    x = torch.zeros(4, 6, 2)
    valid = torch.zeros(4, 6, dtype=torch.bool)
    x[0, :2] = torch.tensor([[1.0, 1.0], [5.0, 5.0]])  # 2 points, k = 3
    valid[0, :2] = True
    x[1, :5] = torch.tensor([[2.0, 0.0]] * 3 + [[7.0, 1.0]] * 2)  # 5 points, 2 distinct, k = 3
    valid[1, :5] = True
    x[2] = torch.arange(12.0).view(6, 2)  # 6 distinct points, k = 2: not deficient
    valid[2] = True
    # group 3: no valid point at all
    res = kmeans(x, valid, torch.tensor([3, 3, 2, 2]))
    assert res.deficient.tolist() == [True, True, False, True]
    assert res.center_mask.tolist() == [
        [True, True, False],
        [True, True, False],
        [True, True, False],
        [False] * 3,
    ]
    got0 = sorted(map(tuple, res.centers[0][res.center_mask[0]].tolist()))
    got1 = sorted(map(tuple, res.centers[1][res.center_mask[1]].tolist()))
    assert got0 == [(1.0, 1.0), (5.0, 5.0)] and got1 == [(2.0, 0.0), (7.0, 1.0)]
    assert res.inertia[:2].tolist() == [0.0, 0.0] and res.inertia[3].item() == 0.0
    assert (res.centers[~res.center_mask] == 0).all() and (res.labels[3] == -1).all()


def test_per_group_k_and_k_max() -> None:
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(3, 100, 4)).astype(np.float32))
    res = kmeans(x, torch.ones(3, 100, dtype=torch.bool), torch.tensor([1, 0, 3]), k_max=5)
    assert res.centers.shape == (3, 5, 4)
    assert res.center_mask.tolist() == [[True] + [False] * 4, [False] * 5, [True] * 3 + [False] * 2]
    torch.testing.assert_close(res.centers[0, 0], x[0].mean(0), rtol=1e-5, atol=1e-5)  # k = 1: the mean
    assert set(res.labels[2].tolist()) == {0, 1, 2} and (res.labels[1] == -1).all()
    with pytest.raises(ValueError, match="k_max"):
        kmeans(x, torch.ones(3, 100, dtype=torch.bool), torch.tensor([1, 0, 3]), k_max=2)


def test_lloyd_iterations_written_out_from_the_same_seeding() -> None:
    """faiss's Lloyd iterations equal plain Lloyd written out, from the centres of its own seeding."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(3, 120, 3)).astype(np.float32))
    valid, k = torch.ones(3, 120, dtype=torch.bool), torch.tensor([2, 3, 4])
    seeds = kmeans(x, valid, k, iters=0, n_init=1)
    run = kmeans(x, valid, k, iters=10, n_init=1)
    for i in range(3):
        ki = int(k[i])
        c = seeds.centers[i, :ki].double()
        for _ in range(10):  # plain Lloyd, written out
            lab = torch.cdist(x[i].double(), c).argmin(1)
            c = torch.stack([x[i][lab == j].double().mean(0) for j in range(ki)])
        got = run.centers[i, :ki].double()
        assert min(float((got[list(p)] - c).abs().max()) for p in itertools.permutations(range(ki))) < 1e-4


def test_partly_filled_banks_give_the_same_result_as_trimmed_ones() -> None:
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.normal(size=(3, 400, 4)).astype(np.float32))
    valid = torch.zeros(3, 400, dtype=torch.bool)
    valid[0, :50], valid[1, :120], valid[2, :7] = True, True, True  # ring-buffer prefixes
    k = torch.tensor([2, 3, 2])
    res = kmeans(x, valid, k)
    trimmed = kmeans(x[:, :120], valid[:, :120], k)
    torch.testing.assert_close(res.centers, trimmed.centers)
    assert res.labels.shape == (3, 400) and torch.equal(res.labels[:, :120], trimmed.labels)
    assert (res.labels[:, 120:] == -1).all()


def test_faiss_subsample_option_still_finds_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(1)
    truth = torch.randn(2, 6, generator=gen) * 20
    member = torch.randint(0, 2, (1, 2000), generator=gen)
    x = truth[member] + torch.randn(1, 2000, 6, generator=gen)
    valid, k = torch.ones(1, 2000, dtype=torch.bool), torch.tensor([2])
    sub = kmeans(x, valid, k, points_per_centroid=32)  # 64 of 2000 points seed and iterate
    full = kmeans(x, valid, k)
    assert torch.cdist(sub.centers[0], truth).min(1).values.max() < 1.0
    assert not torch.equal(sub.centers, full.centers)  # a different sample, not all points
    assert full.inertia.item() <= sub.inertia.item() * 1.0001
