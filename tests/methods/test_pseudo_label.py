"""Pseudo-labels and filters (Eq. (3)-(6)) worked by hand on a 1x3x2x2 example, plus numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brpg_lightning.methods.pseudo_label import (
    confidence_mask,
    drop_percent_schedule,
    entropy,
    entropy_mask,
    entropy_percentile_mask,
    masked_cross_entropy,
    pseudo_label,
    unsup_filter_mask,
)

# pixel (y, x): class probabilities
PIXELS = {
    (0, 0): [0.7, 0.2, 0.1],
    (0, 1): [0.2, 0.5, 0.3],
    (1, 0): [0.25, 0.3, 0.45],
    (1, 1): [0.0, 0.0, 1.0],  # 0 log 0 := 0
}
# entropies by hand (natural log):
# (0,0): 0.7*0.35667 + 0.2*1.60944 + 0.1*2.30259 = 0.80182
# (0,1): 0.2*1.60944 + 0.5*0.69315 + 0.3*1.20397 = 1.02965
# (1,0): 0.25*1.38629 + 0.3*1.20397 + 0.45*0.79851 = 1.06709
# (1,1): 0
HAND_ENTROPY = [[0.80182, 1.02965], [1.06709, 0.0]]


def probs_example() -> torch.Tensor:
    p = torch.zeros(1, 3, 2, 2)
    for (y, x), v in PIXELS.items():
        p[0, :, y, x] = torch.tensor(v)
    return p


def test_pseudo_label_eq3() -> None:
    conf, label = pseudo_label(probs_example())
    assert label.dtype == torch.long
    assert label.tolist() == [[[0, 1], [2, 2]]]
    assert torch.allclose(conf, torch.tensor([[[0.7, 0.5], [0.45, 1.0]]]))


def test_entropy_by_hand_and_numpy() -> None:
    ent = entropy(probs_example())
    assert ent.shape == (1, 2, 2)
    assert torch.allclose(ent[0], torch.tensor(HAND_ENTROPY), atol=1e-4)
    p = probs_example().double().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    np.testing.assert_allclose(ent.double().numpy(), ref, atol=1e-6)
    assert torch.isfinite(ent).all()


def test_confidence_mask_eq4_is_inclusive() -> None:
    conf, _ = pseudo_label(probs_example())
    assert confidence_mask(conf, 0.5).tolist() == [[[True, True], [False, True]]]  # 0.5 >= 0.5
    assert confidence_mask(conf, 0.71).tolist() == [[[False, False], [False, True]]]


def test_entropy_mask_eq5_is_strict() -> None:
    assert entropy_mask(probs_example(), 1.0).tolist() == [[[True, False], [False, True]]]
    assert entropy_mask(probs_example(), 0.0).tolist() == [[[False, False], [False, False]]]  # 0 < 0 is False


def test_entropy_percentile_mask_by_hand() -> None:
    ent = torch.tensor([[[0.1, 0.5, 0.3], [0.9, 0.7, 0.2]]])
    valid = torch.tensor([[[True, True, True], [False, True, True]]])
    # valid sorted: 0.1 0.2 0.3 0.5 0.7
    # drop 25 %: 75th percentile at index 0.75 * 4 = 3 -> 0.5; keep ent < 0.5
    assert entropy_percentile_mask(ent, valid, 25.0).tolist() == [[[True, False, True], [False, False, True]]]
    # drop 10 %: index 3.6 -> 0.5 + 0.6 * (0.7 - 0.5) = 0.62 (interpolated); keep 0.5, drop 0.7
    assert entropy_percentile_mask(ent, valid, 10.0).tolist() == [[[True, True, True], [False, False, True]]]
    # drop 30 %: index 2.8 -> 0.3 + 0.8 * 0.2 = 0.46
    assert entropy_percentile_mask(ent, valid, 30.0).tolist() == [[[True, False, True], [False, False, True]]]
    # drop 0 keeps every valid pixel (U2PL's percentile 100 would drop the maximum)
    assert torch.equal(entropy_percentile_mask(ent, valid, 0.0), valid)
    assert torch.equal(entropy_percentile_mask(ent, valid, -5.0), valid)
    # drop 100: threshold is the minimum, nothing is strictly below it
    assert not entropy_percentile_mask(ent, valid, 100.0).any()
    # no valid pixel: nothing kept
    assert not entropy_percentile_mask(ent, torch.zeros_like(valid), 20.0).any()


@pytest.mark.parametrize("drop", [1.0, 7.5, 20.0, 33.3, 50.0, 90.0])
def test_entropy_percentile_mask_matches_numpy(drop: float) -> None:
    g = torch.Generator().manual_seed(int(drop * 10))
    ent = torch.rand(3, 5, 7, generator=g, dtype=torch.float64)
    valid = torch.rand(3, 5, 7, generator=g) < 0.7
    thresh = np.percentile(ent[valid].numpy(), 100 - drop)  # linear interpolation
    expected = valid.numpy() & (ent.numpy() < thresh)
    np.testing.assert_array_equal(entropy_percentile_mask(ent, valid, drop).numpy(), expected)


def test_entropy_percentile_mask_matches_numpy_on_float32() -> None:
    g = torch.Generator().manual_seed(7)
    ent = torch.rand(2, 9, 9, generator=g)
    valid = torch.rand(2, 9, 9, generator=g) < 0.8
    thresh = np.percentile(ent[valid].numpy().astype(np.float64), 80.0)
    expected = valid.numpy() & (ent.numpy() < thresh)
    np.testing.assert_array_equal(entropy_percentile_mask(ent, valid, 20.0).numpy(), expected)


def test_drop_percent_schedule() -> None:
    assert drop_percent_schedule(0, 80) == 20.0  # first epoch: start
    assert drop_percent_schedule(40, 80) == 10.0  # middle: half
    assert drop_percent_schedule(79, 80) == pytest.approx(0.25)  # last: 20 * 1/80
    assert drop_percent_schedule(10, 40, start=30.0) == pytest.approx(22.5)


def test_unsup_filter_mask_dispatch_respects_valid() -> None:
    probs = probs_example()
    valid = torch.tensor([[[True, True], [True, False]]])
    conf = unsup_filter_mask("confidence", probs, valid, eta=0.5, beta=1.0, drop_percent=25.0)
    assert conf.tolist() == [[[True, True], [False, False]]]
    ent = unsup_filter_mask("entropy", probs, valid, eta=0.5, beta=1.0, drop_percent=25.0)
    assert ent.tolist() == [[[True, False], [False, False]]]
    # valid entropies 0.80182, 1.02965, 1.06709: 50th percentile = 1.02965, keep strictly below
    pct = unsup_filter_mask("entropy_percentile", probs, valid, eta=0.5, beta=1.0, drop_percent=50.0)
    assert pct.tolist() == [[[True, False], [False, False]]]


def test_unsup_filter_mask_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"'topk'.*'entropy_percentile'"):
        unsup_filter_mask(
            "topk", probs_example(), torch.ones(1, 2, 2, dtype=torch.bool), eta=0, beta=0, drop_percent=0
        )


def test_masked_cross_entropy_eq6_sum_over_count() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 2, 2, generator=g, requires_grad=True)
    target = torch.tensor([[[0, 2], [1, 255]]])
    keep = torch.tensor([[[True, False], [True, True]]])  # (1,1) kept but its target is ignore
    log_p = torch.log_softmax(logits.detach().double(), dim=1)[0]
    manual = (-(log_p[0, 0, 0]) - log_p[1, 1, 0]) / 2  # M = 2 counted pixels
    loss = masked_cross_entropy(logits, target, keep)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, :, 0, 1].abs().sum() == 0  # pixel not kept gets no gradient


def test_masked_cross_entropy_nothing_kept() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = masked_cross_entropy(
        logits, torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.bool)
    )
    assert loss.item() == 0.0 and torch.isfinite(loss) and loss.requires_grad
