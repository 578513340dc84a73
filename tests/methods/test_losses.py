"""Supervised losses against naive references: CE (Eq. (2)) and U2PL's OHEM in all its regimes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brpg_lightning.methods.losses import SupervisedLoss, cross_entropy, ohem_cross_entropy

IGNORE = 255


def _pixels(logits: torch.Tensor, target: torch.Tensor):
    """``(p_true, ce)`` of each valid pixel, by a plain loop in float64 numpy."""
    lg = logits.detach().double().numpy()
    tg = target.numpy()
    out = []
    for b, y, x in np.ndindex(*tg.shape):
        t = tg[b, y, x]
        if t == IGNORE:
            continue
        z = lg[b, :, y, x]
        log_p = z - z.max() - np.log(np.exp(z - z.max()).sum())
        out.append((float(np.exp(log_p[t])), float(-log_p[t])))
    return out


def _reference_ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    ces = [ce for _, ce in _pixels(logits, target)]
    return sum(ces) / len(ces)


def _reference_ohem(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int) -> float:
    pix = _pixels(logits, target)
    if len(pix) == 0 or len(pix) < min_kept:
        return sum(ce for _, ce in pix) / max(len(pix), 1)
    if min_kept <= 0:  # U2PL's loss_helper applies the kept mask only inside `if self.min_kept > 0`
        return sum(ce for _, ce in pix) / len(pix)
    threshold = thresh
    kth = sorted(p for p, _ in pix)[min(len(pix), min_kept) - 1]
    if kth > thresh:
        threshold = kth
    kept = [ce for p, ce in pix if p <= threshold]
    return sum(kept) / len(kept)


def make(seed: int, b: int = 2, c: int = 4, h: int = 3, w: int = 5, scale: float = 1.0, boost: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * scale
    target = torch.randint(0, c, (b, h, w), generator=g)
    logits = logits + boost * torch.nn.functional.one_hot(target, c).permute(0, 3, 1, 2)
    target[torch.rand(b, h, w, generator=g) < 0.2] = IGNORE
    return logits.requires_grad_(), target


def test_cross_entropy_matches_log_softmax_gather() -> None:
    logits, target = make(0)
    assert (target == IGNORE).any() and (target != IGNORE).any()
    assert cross_entropy(logits, target).item() == pytest.approx(_reference_ce(logits, target), rel=1e-5)


def test_cross_entropy_all_ignored_is_zero_with_graph() -> None:
    logits, _ = make(1)
    target = torch.full((2, 3, 5), IGNORE)
    loss = cross_entropy(logits, target)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert ohem_cross_entropy(logits, target, min_kept=0).item() == 0.0


def test_ohem_with_min_kept_zero_is_plain_ce_whatever_thresh() -> None:
    # with thresh 0.3 a threshold-only OHEM would drop the pixels whose p_true exceeds it
    logits, target = make(7, boost=1.0)
    pix = _pixels(logits, target)
    dropped = [p for p, _ in pix if p > 0.3]
    assert 0 < len(dropped) < len(pix)  # the threshold would change the loss
    ce = sum(c for _, c in pix) / len(pix)  # plain mean CE over every valid pixel
    thresholded = sum(c for p, c in pix if p <= 0.3) / (len(pix) - len(dropped))
    assert thresholded != pytest.approx(ce, rel=1e-3)
    for thresh in (0.3, 0.7):
        loss = ohem_cross_entropy(logits, target, thresh=thresh, min_kept=0)
        assert loss.item() == pytest.approx(ce, rel=1e-5)
    loss = SupervisedLoss("ohem", ohem_thresh=0.3, ohem_min_kept=0)(logits, target)
    assert loss.item() == pytest.approx(ce, rel=1e-5)


def test_ohem_fewer_valid_than_min_kept_is_plain_ce() -> None:
    logits, target = make(2)
    n_valid = int((target != IGNORE).sum())
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=n_valid + 1)
    assert loss.item() == pytest.approx(_reference_ce(logits, target), rel=1e-5)
    assert loss.item() == pytest.approx(_reference_ohem(logits, target, 0.7, n_valid + 1), rel=1e-5)


def test_ohem_threshold_from_kth_value() -> None:
    logits, target = make(3, boost=4.0)  # confident: every p_true above thresh
    p_true = sorted(p for p, _ in _pixels(logits, target))
    k = 5
    assert p_true[k - 1] > 0.7  # so the k-th smallest becomes the threshold
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=k)
    expected = _reference_ohem(logits, target, 0.7, k)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    hardest_k = sorted(_pixels(logits, target))[:k]  # hand: mean CE of the k least confident pixels
    assert expected == pytest.approx(sum(ce for _, ce in hardest_k) / k)
    assert loss.item() != pytest.approx(_reference_ce(logits, target), rel=1e-3)


def test_ohem_threshold_from_thresh() -> None:
    logits, target = make(4, boost=1.5)  # mixed: p_true on both sides of thresh
    pix = _pixels(logits, target)
    k = 3
    assert sorted(p for p, _ in pix)[k - 1] <= 0.7  # so thresh stays the threshold
    n_kept = sum(p <= 0.7 for p, _ in pix)
    assert k < n_kept < len(pix)  # and it drops some pixels but keeps more than k
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=k)
    assert loss.item() == pytest.approx(_reference_ohem(logits, target, 0.7, k), rel=1e-5)
    # a lower thresh keeps fewer pixels: only those with p_true <= 0.3
    loss_low = ohem_cross_entropy(logits, target, thresh=0.3, min_kept=k)
    kept = [ce for p, ce in pix if p <= 0.3]
    assert 0 < len(kept) < len(pix) and sorted(p for p, _ in pix)[k - 1] <= 0.3
    assert loss_low.item() == pytest.approx(sum(kept) / len(kept), rel=1e-5)


def test_ohem_gradient_only_on_kept_pixels() -> None:
    logits, target = make(5, boost=4.0)
    ohem_cross_entropy(logits, target, thresh=0.7, min_kept=4).backward()
    touched = (logits.grad.abs().sum(1) > 0).sum().item()
    assert touched == 4


@pytest.mark.parametrize("kind", ["ce", "ohem", "ce+ohem"])
def test_supervised_loss_kinds(kind: str) -> None:
    logits, target = make(6, scale=0.5)
    loss = SupervisedLoss(kind, ce_weight=0.3, ohem_weight=0.7, ohem_thresh=0.6, ohem_min_kept=4)
    ce, ohem = _reference_ce(logits, target), _reference_ohem(logits, target, 0.6, 4)
    expected = {"ce": ce, "ohem": ohem, "ce+ohem": 0.3 * ce + 0.7 * ohem}[kind]
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_supervised_loss_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"'focal'.*'ce\+ohem'"):
        SupervisedLoss("focal")
