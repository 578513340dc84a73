"""Eq. (19): linear eta_t ramp."""

from __future__ import annotations

import pytest

from brpg_lightning.brpg.schedules import eta_t


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
