"""Learning-rate schedules (paper Sec. 4.1.4)."""

from __future__ import annotations


def poly_lr_factor(step: int, total_steps: int, power: float = 0.9) -> float:
    """Polynomial decay ``(1 - step / total_steps) ** power``, 0 once ``step >= total_steps`` (Sec. 4.1.4).

    Multiply the initial learning rate by it: ``lr = lr_init * (1 - i_iter / total_i_iter) ** 0.9``.

    Example:
        >>> poly_lr_factor(0, 100), poly_lr_factor(50, 100, power=1.0), poly_lr_factor(100, 100)
        (1.0, 0.5, 0.0)
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step >= total_steps:
        return 0.0
    return (1.0 - max(step, 0) / total_steps) ** power
