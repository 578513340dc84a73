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


def eta_t_from_epoch(
    curr_iter: int,
    iters_per_epoch: float,
    epochs: int,
    origin_epoch: int = 5,
    eta_0: float = 0.8,
    eta_e: float = 0.95,
) -> float:
    """Eq. (19) as the official implementation computes it: iterations counted from a fixed epoch.

    ``eta_t = eta_0 + (eta_e - eta_0) * (curr_iter - origin_epoch * n) / ((epochs - origin_epoch) * n)``
    with ``n = iters_per_epoch`` (the official code hard-codes ``origin_epoch = 5``, whatever the
    sampling range). The ratio is not clamped: before ``origin_epoch`` the threshold is below ``eta_0``
    (e.g. PASCAL's prototype stage starts at epoch 2). ``epochs <= origin_epoch`` gives ``eta_e``.

    Example:
        >>> round(eta_t_from_epoch(200, 100, 80), 6), eta_t_from_epoch(500, 100, 80), eta_t_from_epoch(8000, 100, 80)
        (0.794, 0.8, 0.95)
    """
    span = (epochs - origin_epoch) * iters_per_epoch
    if span <= 0:
        return float(eta_e)
    return float(eta_0 + (eta_e - eta_0) * (curr_iter - origin_epoch * iters_per_epoch) / span)
