"""APO (Eq. 11-14): dispersion scores and the percentile rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brpg_lightning.brpg.apo import apo_extra, apo_extra_official, dispersion, official_pick_count


def _reference_dispersion(x: torch.Tensor, valid: torch.Tensor, indicator: str) -> list[float]:
    """Eq. (11) / (13) with explicit loops over groups and features, in float64."""
    out = []
    for g in range(x.shape[0]):
        feats = [x[g, i].double() for i in range(x.shape[1]) if valid[g, i]]
        if not feats:
            out.append(math.nan)
            continue
        mean = sum(feats) / len(feats)
        if indicator == "cosine":
            terms = [float(f @ mean / (f.norm() * mean.norm())) for f in feats]
        else:
            terms = [float((f - mean).norm()) for f in feats]
        out.append(sum(terms) / len(terms))
    return out


@pytest.mark.parametrize("indicator", ["cosine", "l2"])
def test_dispersion_matches_reference(indicator: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 50, 6, generator=gen) + torch.randn(4, 1, 6, generator=gen)).half()
    valid = torch.rand(4, 50, generator=gen) < 0.7
    valid[3] = False  # empty bank -> NaN
    x[~valid] = torch.nan  # unused slots never read
    got = dispersion(x, valid, indicator)
    ref = _reference_dispersion(x, valid, indicator)
    assert math.isnan(got[3].item()) and math.isnan(ref[3])
    torch.testing.assert_close(got[:3], torch.tensor(ref[:3], dtype=torch.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("indicator", ["cosine", "l2"])
def test_planted_scattered_class_is_picked(indicator: str) -> None:
    gen = torch.Generator().manual_seed(1)
    c, n, d = 21, 200, 16
    centres = torch.randn(c, 1, d, generator=gen) * 5 + 10
    x = centres + 0.3 * torch.randn(c, n, d, generator=gen)
    x[7] = centres[7] + 4.0 * torch.randn(n, d, generator=gen)  # class 7 is scattered
    scores = dispersion(x, torch.ones(c, n, dtype=torch.bool), indicator)
    extra = apo_extra(scores, alpha_t=0.05, indicator=indicator)
    assert extra.tolist() == [1 if i == 7 else 0 for i in range(c)]


def _gamma_by_hand(sorted_scores: list[float], q: float) -> float:
    """numpy's linear percentile: position q * (n - 1) between order statistics."""
    pos = q * (len(sorted_scores) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_scores) - 1)
    return sorted_scores[lo] + (pos - lo) * (sorted_scores[hi] - sorted_scores[lo])


# np.percentile's linear rule puts gamma at position p = 0.05 * (C - 1) of the sorted scores:
# C=6 -> p=0.25 (s0 < gamma < s1: 1 class), C=19 -> 0.9 (1), C=21 -> 1.0 (gamma = s1, strict "<": only s0),
# C=81 -> 4.0 (gamma = s4: s0..s3, 4 classes). The l2 rule mirrors it at 0.95 * (C - 1) with ">".
@pytest.mark.parametrize(("num_classes", "expected"), [(6, 1), (19, 1), (21, 1), (81, 4)])
@pytest.mark.parametrize("indicator", ["cosine", "l2"])
def test_percentile_rule_counts(num_classes: int, expected: int, indicator: str) -> None:
    gen = torch.Generator().manual_seed(num_classes)
    scores = torch.rand(num_classes, generator=gen, dtype=torch.float64).float()  # distinct
    extra = apo_extra(scores, alpha_t=0.05, indicator=indicator)
    assert int(extra.sum()) == expected
    s = sorted(scores.tolist())
    if indicator == "cosine":
        gamma = np.percentile(scores.numpy(), 5.0)
        assert gamma == pytest.approx(_gamma_by_hand(s, 0.05))
        picked = (scores.numpy() < gamma).astype(int)
        assert set(torch.nonzero(extra).flatten().tolist()) == {int(i) for i in scores.argsort()[:expected]}
    else:
        gamma = np.percentile(scores.numpy(), 95.0)
        assert gamma == pytest.approx(_gamma_by_hand(s, 0.95))
        picked = (scores.numpy() > gamma).astype(int)
        assert set(torch.nonzero(extra).flatten().tolist()) == {int(i) for i in scores.argsort()[-expected:]}
    assert extra.tolist() == picked.tolist()


def test_n_add_and_nan_scores() -> None:
    scores = torch.tensor([0.9, math.nan, 0.2, 0.8, 0.85, 0.95, math.nan])
    extra = apo_extra(scores, alpha_t=0.05, indicator="cosine", n_add=3)
    # finite [0.2, 0.8, 0.85, 0.9, 0.95]: gamma = 0.2 + 0.2 * 0.6 = 0.32 -> only 0.2
    assert extra.tolist() == [0, 0, 3, 0, 0, 0, 0] and extra.dtype == torch.long
    assert apo_extra(scores, indicator="l2", n_add=2).tolist() == [0, 0, 0, 0, 0, 2, 0]
    assert apo_extra(torch.full((3,), math.nan)).tolist() == [0, 0, 0]
    assert apo_extra(scores, alpha_t=0.0).sum() == 0  # gamma = min: nothing strictly below


def test_bad_indicator() -> None:
    with pytest.raises(ValueError, match="indicator"):
        apo_extra(torch.rand(3), indicator="l1")


# Official count (u2pl/utils/utils.py): add_cla_num = int(round(add_proportion * num_classes)), 0 -> 1, with
# Python's round of the float product: 0.05 * 7 = 0.35 -> 0 -> 1; 0.05 * 10 = 0.5 -> 0 (half to even) -> 1;
# 0.05 * 21 = 1.05 -> 1; 0.05 * 22 = 1.1 -> 1; 0.05 * 30 = 1.5000000000000002 -> 2; 0.05 * 50 = 2.5 -> 2 (half
# to even); 0.05 * 81 = 4.05 -> 4; 0.05 * 90 = 4.5 -> 4 (half to even).
@pytest.mark.parametrize(
    ("num_classes", "expected"), [(7, 1), (10, 1), (21, 1), (22, 1), (30, 2), (50, 2), (81, 4), (90, 4)]
)
def test_official_pick_count_by_hand(num_classes: int, expected: int) -> None:
    assert official_pick_count(num_classes, 0.05) == expected


def test_paper_and_official_counts_differ_for_22_classes() -> None:
    scores = torch.linspace(0.5, 0.95, 22)  # distinct, ascending: class i has the i-th smallest score
    # paper: gamma at position 0.05 * 21 = 1.05 -> s0 and s1 lie below it; official: the 1 smallest
    assert torch.nonzero(apo_extra(scores, 0.05, "cosine")).flatten().tolist() == [0, 1]
    assert torch.nonzero(apo_extra_official(scores, 0.05, "cosine")).flatten().tolist() == [0]
    assert torch.nonzero(apo_extra(scores, 0.05, "l2")).flatten().tolist() == [20, 21]
    assert torch.nonzero(apo_extra_official(scores, 0.05, "l2")).flatten().tolist() == [21]


@pytest.mark.parametrize("indicator", ["cosine", "l2"])
def test_official_picks_the_extremes_by_hand(indicator: str) -> None:
    # 30 classes: official count 2. Scores with a tie at the 2nd extreme: the official "<=" / ">=" keeps both
    scores = torch.full((30,), 0.6)
    scores[[4, 9, 17]] = torch.tensor([0.1, 0.2, 0.2]) if indicator == "cosine" else torch.tensor([0.9, 0.8, 0.8])
    extra = apo_extra_official(scores, alpha_t=0.05, indicator=indicator, n_add=2)
    assert torch.nonzero(extra).flatten().tolist() == [4, 9, 17] and set(extra.tolist()) == {0, 2}
    scores[17] = 0.6  # no tie: exactly the 2 extremes
    assert torch.nonzero(apo_extra_official(scores, 0.05, indicator)).flatten().tolist() == [4, 9]


def test_official_never_picks_an_empty_bank() -> None:
    scores = torch.tensor([math.nan, 0.4, 0.7, math.nan])
    assert apo_extra_official(scores, 0.05, "cosine").tolist() == [0, 1, 0, 0]
    assert apo_extra_official(scores, 0.05, "l2").tolist() == [0, 0, 1, 0]
    assert apo_extra_official(torch.full((3,), math.nan)).tolist() == [0, 0, 0]


# Two classes (background / foreground), worked by hand. Paper rule: gamma = s_lo + alpha_t (s_hi - s_lo) for the
# cosine rule, s_lo + (1 - alpha_t) (s_hi - s_lo) for l2. Official count: max(1, round(alpha_t * 2)), which
# rounds to 0 for alpha_t < 0.25 (0.25 itself: round(0.5) = 0, halves to even) and is 2 = C for alpha_t >= 0.75.
@pytest.mark.parametrize(
    ("scores", "alpha_t", "indicator", "paper", "official"),
    [
        # gamma = 0.6 + 0.05 * 0.3 = 0.615: only 0.6 below it; official n = max(1, round(0.1)) = 1: the lower one
        ([0.9, 0.6], 0.05, "cosine", [0, 1], [0, 1]),
        # gamma = 0.6 + 0.95 * 0.3 = 0.885: only 0.9 above it; official: the higher one
        ([0.9, 0.6], 0.05, "l2", [1, 0], [1, 0]),
        # alpha_t = 1: gamma = max, strict "<" keeps the lower one only; official n = round(2) = 2 = C: both
        ([0.9, 0.6], 1.0, "cosine", [0, 1], [1, 1]),
        # alpha_t = 0.25: official round(0.5) = 0 -> 1; paper gamma = 0.675: 0.6 below
        ([0.9, 0.6], 0.25, "cosine", [0, 1], [0, 1]),
        # alpha_t = 0: gamma = min, nothing strictly below; official still picks max(1, 0) = 1 class
        ([0.9, 0.6], 0.0, "cosine", [0, 0], [0, 1]),
        # a tie: nothing is more scattered than the other (paper); official ties at the threshold: both
        ([0.7, 0.7], 0.05, "cosine", [0, 0], [1, 1]),
        # an empty bank (NaN): gamma = the one finite score, none strictly below; official n = min(1, 1 finite)
        ([math.nan, 0.5], 1.0, "cosine", [0, 0], [0, 1]),
    ],
)
def test_two_classes_by_hand(scores: list[float], alpha_t: float, indicator: str, paper: list[int],
                             official: list[int]) -> None:
    s = torch.tensor(scores)
    assert apo_extra(s, alpha_t, indicator).tolist() == paper
    assert apo_extra_official(s, alpha_t, indicator).tolist() == official
