"""The official pooling of unlabeled L_pro points: B_u * M_u drawn from the whole batch's candidates."""

from __future__ import annotations

import pytest
import torch

from brpg_lightning.brpg.pooled_sampling import pooled_random_points


def _picked(coords: torch.Tensor, valid: torch.Tensor) -> list[tuple[int, int, int]]:
    return [(b, y, x) for b in range(coords.shape[0]) for y, x in coords[b][valid[b]].tolist()]


@pytest.mark.parametrize("num", [2, 5, 40])
def test_distinct_candidates_total_capped_at_batch_times_num(num: int) -> None:
    gen = torch.Generator().manual_seed(0)
    cand = torch.rand(3, 9, 11, generator=gen) < 0.3
    cand[2] = False  # an image without candidates
    coords, valid = pooled_random_points(cand, num, generator=torch.Generator().manual_seed(1))
    picked = _picked(coords, valid)
    # official: all candidates when fewer than B_u * M_u, else exactly B_u * M_u of them
    assert len(picked) == min(3 * num, int(cand.sum()))
    assert len(set(picked)) == len(picked)  # no duplicates
    assert all(bool(cand[b, y, x]) for b, y, x in picked)  # never a non-candidate, always in its own image
    assert coords.shape[1] == max(1, int(valid.sum(1).max()))  # padded to the largest per-image count
    for b in range(3):
        assert valid[b].tolist() == sorted(valid[b].tolist(), reverse=True)  # valid rows first
        assert (coords[b][~valid[b]] == 0).all()


def test_an_image_may_give_more_than_M_u_points() -> None:
    # image 0: 10 candidates, image 1: 1 candidate; B_u * M_u = 2 * 3 = 6 points from the 11 pooled ones
    cand = torch.zeros(2, 4, 4, dtype=torch.bool)
    cand[0].view(-1)[:10] = True
    cand[1, 3, 3] = True
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(2, 4, 4)
    draws = 3000
    for _ in range(draws):
        coords, valid = pooled_random_points(cand, 3, generator=gen)
        assert int(valid.sum()) == 6 and int(valid[0].sum()) >= 5  # per image the paper's rule gives <= 3
        for b, y, x in _picked(coords, valid):
            hits[b, y, x] += 1
    # uniform without replacement over the pool: every candidate is in a draw with probability 6 / 11
    assert torch.allclose(hits[cand] / draws, torch.full((11,), 6 / 11), atol=0.04)
    assert hits[~cand].sum() == 0


def test_no_candidate_gives_one_invalid_row_per_image() -> None:
    coords, valid = pooled_random_points(torch.zeros(2, 3, 3, dtype=torch.bool), 4)
    assert coords.shape == (2, 1, 2) and not valid.any() and (coords == 0).all()
