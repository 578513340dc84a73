"""Eq. (19): linear eta_t ramp."""

from __future__ import annotations

import pytest

from brpg_lightning.brpg.schedules import eta_t, eta_t_from_epoch


def test_start_middle_end() -> None:
    assert eta_t(0, 1000) == pytest.approx(0.8)
    assert eta_t(500, 1000) == pytest.approx(0.8 + 0.15 * 0.5)
    assert eta_t(250, 1000, eta_0=0.8, eta_e=0.9) == pytest.approx(0.825)
    assert eta_t(1000, 1000) == pytest.approx(0.95)


def test_clamped_and_degenerate() -> None:
    assert eta_t(2000, 1000) == pytest.approx(0.95)
    assert eta_t(-5, 1000) == pytest.approx(0.8)
    assert eta_t(3, 0) == pytest.approx(0.95)
    assert eta_t(3, -1, eta_e=0.9) == pytest.approx(0.9)


def test_official_epoch5_origin_by_hand() -> None:
    # train_semi.py: 0.8 + (0.95 - 0.8) * (i_iter - 5 * L) / ((epochs - 5) * L), L iterations per epoch
    # PASCAL: 80 epochs, L = 100. Prototype stage starts at epoch 2 (i_iter 200): (200 - 500) / 7500 = -0.04
    assert eta_t_from_epoch(200, 100, 80) == pytest.approx(0.8 - 0.15 * 0.04)  # 0.794: below eta_0, unclamped
    assert eta_t_from_epoch(500, 100, 80) == pytest.approx(0.8)
    assert eta_t_from_epoch(4250, 100, 80) == pytest.approx(0.875)  # (4250 - 500) / 7500 = 0.5
    assert eta_t_from_epoch(7999, 100, 80) == pytest.approx(0.8 + 0.15 * 7499 / 7500)
    # Cityscapes: T_S2 = 6 is after epoch 5: at its first step (600 of 200 x 100) the ramp has already moved
    assert eta_t_from_epoch(600, 100, 200) == pytest.approx(0.8 + 0.15 * 100 / 19500)
    assert eta_t_from_epoch(10, 100, 5) == pytest.approx(0.95)  # no iteration after epoch 5
