"""Schedules of BRPG's hyper-parameters."""

from __future__ import annotations


def eta_t(curr_iter: int, total_iter: int, eta_0: float = 0.8, eta_e: float = 0.95) -> float:
    """Eq. (19): ``eta_t = eta_0 + (eta_e - eta_0) * curr_iter / total_iter``.

    The pseudo-label confidence threshold of ``L_pro^u`` (Eq. 18), raised linearly over the iterations
    after the sampling stage. ``curr_iter / total_iter`` is clamped to ``[0, 1]``; ``total_iter <= 0``
    gives ``eta_e``.

    Example:
        >>> eta_t(0, 100), eta_t(50, 100), eta_t(100, 100), eta_t(5, 0)
        (0.8, 0.875, 0.95, 0.95)
    """
    if total_iter <= 0:
        return float(eta_e)
    ratio = min(max(curr_iter / total_iter, 0.0), 1.0)
    return float(eta_0 + (eta_e - eta_0) * ratio)
