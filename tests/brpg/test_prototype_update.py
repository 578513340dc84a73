"""Eq. (22): per-prototype assignment statistics and the EMA update."""

from __future__ import annotations

import torch

from brpg_lightning.brpg.prototype_update import assignment_stats, ema_update
from brpg_lightning.constants import IGNORE_INDEX


def test_two_prototype_toy_by_hand() -> None:
    # class 0: prototypes along x and y; class 1: one prototype along x (slot 1 masked)
    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    feats = torch.tensor([[3.0, 1.0], [1.0, 2.0], [2.0, 0.0], [0.0, 4.0], [9.0, 9.0], [0.5, 5.0]])
    labels = torch.tensor([0, 0, 0, 0, IGNORE_INDEX, 1])
    sums, counts = assignment_stats(feats, labels, protos, mask)
    # class 0: (3,1) and (2,0) are closer to x, (1,2) and (0,4) to y; class 1: (0.5, 5) to its only prototype
    # (even though it is far more similar to class 0's y prototype: own class only)
    assert counts.tolist() == [[2.0, 2.0], [1.0, 0.0]]
    assert sums.tolist() == [[[5.0, 1.0], [1.0, 6.0]], [[0.5, 5.0], [0.0, 0.0]]]
    new = ema_update(protos, sums, counts, alpha=0.9)
    # r <- 0.9 r + 0.1 * sums / counts
    expected = torch.tensor([[[0.9 + 0.25, 0.05], [0.05, 0.9 + 0.3]], [[0.9 + 0.05, 0.5], [0.0, 0.0]]])
    torch.testing.assert_close(new, expected)
    assert torch.equal(protos[1, 1], torch.zeros(2))  # the masked slot stays as it is


def test_unassigned_prototypes_unchanged_and_input_untouched() -> None:
    protos = torch.randn(3, 2, 4)
    before = protos.clone()
    sums, counts = torch.zeros(3, 2, 4), torch.zeros(3, 2)
    sums[1, 0], counts[1, 0] = torch.ones(4) * 6, 3
    new = ema_update(protos, sums, counts, alpha=0.99)
    assert torch.equal(protos, before)
    others = torch.ones(3, 2, dtype=torch.bool)
    others[1, 0] = False
    torch.testing.assert_close(new[1, 0], 0.99 * before[1, 0] + 0.01 * 2.0)  # mean = 6 / 3
    assert torch.equal(new[others], before[others])


def test_split_batch_stats_add_up() -> None:
    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(5, 3, 8, generator=gen)
    mask = torch.rand(5, 3, generator=gen) < 0.7
    mask[4] = False  # a class without prototypes: its features are not used
    feats = torch.randn(200, 8, generator=gen)
    labels = torch.randint(0, 6, (200,), generator=gen)
    labels[labels == 5] = IGNORE_INDEX
    whole = assignment_stats(feats, labels, protos, mask)
    halves = [assignment_stats(feats[s], labels[s], protos, mask) for s in (slice(0, 77), slice(77, 200))]
    torch.testing.assert_close(halves[0][0] + halves[1][0], whole[0])
    torch.testing.assert_close(halves[0][1] + halves[1][1], whole[1])
    used = (labels != IGNORE_INDEX) & (labels != 4) & mask.any(1)[labels.clamp(max=4)]
    assert whole[1].sum().item() == used.sum().item()
    assert (whole[1][~mask] == 0).all()


def test_precomputed_similarities_give_the_hand_worked_statistics() -> None:
    from brpg_lightning.brpg.prototype_loss import prototype_similarities

    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    feats = torch.tensor([[3.0, 1.0], [1.0, 2.0], [2.0, 0.0], [0.0, 4.0], [9.0, 9.0], [0.5, 5.0]])
    labels = torch.tensor([0, 0, 0, 0, IGNORE_INDEX, 1])
    sums, counts = assignment_stats(feats, labels, protos, mask, sim=prototype_similarities(feats, protos))
    assert counts.tolist() == [[2.0, 2.0], [1.0, 0.0]]  # as worked by hand in the test above
    assert sums.tolist() == [[[5.0, 1.0], [1.0, 6.0]], [[0.5, 5.0], [0.0, 0.0]]]
