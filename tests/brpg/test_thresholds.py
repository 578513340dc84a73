"""Class-specific eta_s (Table 8): EMA toward the class mean confidence, clamped."""

from __future__ import annotations

import pytest
import torch

from brpg_lightning.brpg.thresholds import update_class_thresholds
from brpg_lightning.constants import IGNORE_INDEX


def test_update_by_hand() -> None:
    t = torch.tensor([0.8, 0.8, 0.8, 0.85])
    conf = torch.tensor([0.9, 0.7, 0.95, 0.2, 0.99])
    labels = torch.tensor([0, 0, 2, IGNORE_INDEX, 2])
    out = update_class_thresholds(t, conf, labels, decay=0.9, low=0.7, high=0.9)
    # class 0: mean(0.9, 0.7) = 0.8 -> 0.9*0.8 + 0.1*0.8 = 0.8
    # class 1: absent -> 0.8; class 3: absent -> 0.85 (the ignored 0.2 counts nowhere)
    # class 2: mean(0.95, 0.99) = 0.97 -> 0.9*0.8 + 0.1*0.97 = 0.817
    torch.testing.assert_close(out, torch.tensor([0.8, 0.8, 0.817, 0.85]))
    assert torch.equal(t, torch.tensor([0.8, 0.8, 0.8, 0.85]))  # input untouched


def test_default_decay_is_slow() -> None:
    out = update_class_thresholds(torch.full((2,), 0.8), torch.tensor([0.9]), torch.tensor([1]))
    torch.testing.assert_close(out, torch.tensor([0.8, 0.999 * 0.8 + 0.001 * 0.9]))


@pytest.mark.parametrize(("conf", "expected"), [(0.0, 0.7), (1.0, 0.9)])
def test_clamped_at_both_ends(conf: float, expected: float) -> None:
    t = torch.tensor([0.8, 0.8])
    for _ in range(50):  # decay 0.5: after a few steps the EMA leaves [0.7, 0.9]
        t = update_class_thresholds(t, torch.tensor([conf]), torch.tensor([0]), decay=0.5)
    assert t[0].item() == pytest.approx(expected)
    assert t[1].item() == pytest.approx(0.8)


def test_no_labeled_pixel_changes_nothing() -> None:
    t = torch.tensor([0.75, 0.85])
    out = update_class_thresholds(t, torch.tensor([0.1, 0.2]), torch.tensor([IGNORE_INDEX, IGNORE_INDEX]))
    assert torch.equal(out, t)
