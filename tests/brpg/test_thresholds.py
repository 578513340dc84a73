"""Class-specific eta_s (Table 8) as the official code computes it: the mean probability of the ground-truth
class at the input resolution, an unclamped EMA, clamped (or fixed) only where used."""

from __future__ import annotations

import math

import pytest
import torch

from brpg_lightning.brpg.thresholds import class_confidence_sums, thresholds_in_use, update_class_thresholds
from brpg_lightning.constants import IGNORE_INDEX


def test_class_confidence_is_the_ground_truth_class_probability_by_hand() -> None:
    # stride 1: the upsampled map is the map itself; the probabilities are given, logits = log p
    probs = torch.tensor(
        [
            [[0.7, 0.6], [0.1, 0.5]],  # class 0
            [[0.2, 0.3], [0.1, 0.4]],  # class 1
            [[0.1, 0.1], [0.8, 0.1]],  # class 2
        ]
    ).unsqueeze(0)
    labels = torch.tensor([[[1, 0], [IGNORE_INDEX, 1]]])
    sums, counts = class_confidence_sums(probs.log(), labels, stride=1, num_classes=3)
    # (0,0) label 1 -> p[1] = 0.2 (its max, 0.7, belongs to class 0 and is not read); (0,1) label 0 -> 0.6;
    # (1,0) ignored; (1,1) label 1 -> 0.4
    torch.testing.assert_close(sums, torch.tensor([0.6, 0.6, 0.0]))
    torch.testing.assert_close(counts, torch.tensor([1.0, 2.0, 0.0]))


def test_class_confidence_counts_input_pixels_not_decoder_pixels() -> None:
    # logits constant over each image, so any upsampling gives the same probabilities everywhere
    p0, p1 = torch.tensor([0.9, 0.05, 0.05]), torch.tensor([0.2, 0.3, 0.5])
    logits = torch.stack([p0, p1]).log().view(2, 3, 1, 1).expand(2, 3, 2, 2).contiguous()  # decoder 2 x 2
    labels = torch.zeros(2, 6, 6, dtype=torch.long)  # input 6 x 6 (stride 4 covers it, cropped)
    labels[0, :2] = IGNORE_INDEX  # image 0: 24 pixels of class 0
    labels[1] = 2  # image 1: 36 pixels of class 2 ...
    labels[1, 0, :4] = 0  # ... but 4 of class 0 (probability 0.2 of class 0 there)
    sums, counts = class_confidence_sums(logits, labels, stride=4, num_classes=3)
    torch.testing.assert_close(counts, torch.tensor([28.0, 0.0, 32.0]))
    torch.testing.assert_close(sums, torch.tensor([24 * 0.9 + 4 * 0.2, 0.0, 32 * 0.5]))


def test_update_by_hand_absent_classes_keep_their_value() -> None:
    t = torch.tensor([0.8, 0.8, 0.8, 0.85])
    sums, counts = torch.tensor([1.6, 0.0, 1.94, 0.0]), torch.tensor([2.0, 0.0, 2.0, 0.0])
    out = update_class_thresholds(t, sums, counts, decay=0.9)
    # class 0: mean 0.8 -> 0.9*0.8 + 0.1*0.8 = 0.8; class 2: mean 0.97 -> 0.72 + 0.097 = 0.817
    torch.testing.assert_close(out, torch.tensor([0.8, 0.8, 0.817, 0.85]))
    assert torch.equal(t, torch.tensor([0.8, 0.8, 0.8, 0.85]))  # input untouched


def test_default_decay_is_slow() -> None:
    out = update_class_thresholds(torch.full((2,), 0.8), torch.tensor([0.0, 0.9]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([0.8, 0.999 * 0.8 + 0.001 * 0.9]))


def test_stored_ema_is_unclamped_and_clamped_only_where_used() -> None:
    # official: confidence_sample_ema keeps moving; min(max(ema, thre_min), thre_max) is taken at use
    t = torch.tensor([0.8, 0.8])
    one = torch.tensor([1.0, 0.0])
    for conf in (0.0, 0.0, 0.0):  # decay 0.5: 0.4, 0.2, 0.1
        t = update_class_thresholds(t, one * conf, one, decay=0.5)
    assert t[0].item() == pytest.approx(0.1)
    assert thresholds_in_use(t, 0.7, 0.9)[0].item() == pytest.approx(0.7)
    t = update_class_thresholds(t, one * 1.0, one, decay=0.5)  # 0.5 * 0.1 + 0.5 * 1.0 = 0.55
    assert t[0].item() == pytest.approx(0.55)
    # still at the lower bound where used; a clamped store would have risen to 0.5 * 0.7 + 0.5 = 0.85
    assert thresholds_in_use(t, 0.7, 0.9).tolist() == pytest.approx([0.7, 0.8])


def test_thresholds_in_use_fixed_classes_take_eta_s() -> None:
    t = torch.tensor([0.5, 0.95, 0.85, 0.6, 0.99])
    out = thresholds_in_use(t, low=0.7, high=0.9, fixed_classes=[3, 4], fixed_value=0.8)
    torch.testing.assert_close(out, torch.tensor([0.7, 0.9, 0.85, 0.8, 0.8]))
    assert thresholds_in_use(t, 0.7, 0.9)[4].item() == pytest.approx(0.9)  # not fixed: clamped


def test_no_labeled_pixel_changes_nothing() -> None:
    t = torch.tensor([0.75, 0.85])
    labels = torch.full((1, 2, 2), IGNORE_INDEX)
    sums, counts = class_confidence_sums(torch.zeros(1, 2, 2, 2), labels, stride=1, num_classes=2)
    out = update_class_thresholds(t, sums, counts)
    assert torch.equal(out, t) and not math.isnan(float(out.sum()))
