"""Poly learning-rate factor (Sec. 4.1.4) against hand values."""

from __future__ import annotations

import pytest

from brpg_lightning.methods.schedules import poly_lr_factor


@pytest.mark.parametrize(
    ("step", "total", "power", "expected"),
    [
        (0, 100, 0.9, 1.0),
        (50, 100, 1.0, 0.5),
        (50, 100, 0.9, 0.535887),  # 0.5 ** 0.9 = exp(0.9 * ln 0.5) = exp(-0.623832)
        (75, 100, 2.0, 0.0625),  # 0.25 ** 2
        (99, 100, 0.9, 0.015849),  # 0.01 ** 0.9 = 10 ** -1.8
        (100, 100, 0.9, 0.0),
        (150, 100, 0.9, 0.0),  # clamped past the end
    ],
)
def test_poly_hand_values(step: int, total: int, power: float, expected: float) -> None:
    assert poly_lr_factor(step, total, power) == pytest.approx(expected, abs=1e-6)


def test_poly_is_non_increasing() -> None:
    values = [poly_lr_factor(s, 37) for s in range(40)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_poly_rejects_empty_schedule() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        poly_lr_factor(0, 0)
