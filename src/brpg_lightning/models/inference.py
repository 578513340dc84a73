"""Inference protocols shared by validation, ``evaluate`` and ``predict``: whole image and sliding window.

The sliding window is the official implementation's Cityscapes protocol (U2PL ``validate_citys``): windows
of ``crop`` pixels every ``stride`` pixels, the last window flush with the far edge so every pixel is covered,
overlapping logits averaged. Written by hand because neither smp nor timm ships one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``min(crop, length)`` covering ``[0, length)``.

    Example:
        >>> window_starts(10, 4, 3)
        [0, 3, 6]
        >>> window_starts(11, 4, 3)
        [0, 3, 6, 7]
        >>> window_starts(3, 4, 3)
        [0]
    """
    if crop < 1 or stride < 1:
        raise ValueError(f"crop={crop} and stride={stride} must be >= 1")
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] + crop < length:
        starts.append(length - crop)
    return starts


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@torch.no_grad()
def sliding_window_logits(
    logits_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    crop: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
) -> Tensor:
    """Average of ``logits_fn`` over overlapping windows; ``(B, C, H, W)`` for images ``(B, 3, H, W)``.

    Args:
        logits_fn: maps a window ``(B, 3, h, w)`` to logits at the window's resolution ``(B, C, h, w)``.
        crop: window size (an int or ``(h, w)``); a side longer than the image is clipped to it.
        stride: step between windows; default ``2/3`` of the crop, rounded up (the official code's value).
    """
    crop_h, crop_w = _pair(crop)
    if stride is None:
        stride = (-(-2 * crop_h // 3), -(-2 * crop_w // 3))
    stride_h, stride_w = _pair(stride)
    height, width = images.shape[-2:]
    win_h, win_w = min(crop_h, height), min(crop_w, width)
    total: Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=images.device)
    for top in window_starts(height, win_h, stride_h):
        for left in window_starts(width, win_w, stride_w):
            window = images[..., top : top + win_h, left : left + win_w]
            logits = logits_fn(window).float()
            if logits.shape[-2:] != window.shape[-2:]:
                raise ValueError(f"logits_fn returned {tuple(logits.shape[-2:])} for a {tuple(window.shape[-2:])} window")
            if total is None:
                total = images.new_zeros(images.shape[0], logits.shape[1], height, width, dtype=torch.float32)
            total[..., top : top + win_h, left : left + win_w] += logits
            count[..., top : top + win_h, left : left + win_w] += 1
    assert total is not None
    return total / count
