"""The evaluation protocol and the inference it names, shared by validation, ``evaluate``, ``predict``, ``export``.

:class:`EvalProtocol` is the one value naming how a network is evaluated (whole image, centre crop, sliding
window, with the window's crop and stride). It is built from the dataset config (:meth:`EvalProtocol.from_dataset`),
handed to the datamodule's val transform (centre crop) and to the module (sliding window), stored in the
checkpoint's ``inference`` block as :meth:`EvalProtocol.as_dict` and read back by ``evaluate``, ``predict`` and
``export`` (:func:`brpg_lightning.checkpoint.stored_eval_protocol`).

The sliding window is the official implementation's Cityscapes protocol (U2PL ``validate_citys``): windows
of ``crop`` pixels every ``stride`` pixels, the last window flush with the far edge so every pixel is covered,
overlapping logits averaged. Written by hand because neither smp nor timm ships one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from brpg_lightning.errors import BRPGInputError

EVAL_MODES: tuple[str, ...] = ("whole", "center_crop", "sliding")
"""Evaluation protocols: the whole image, a centre crop (the val transform), windows over the whole image
(the module)."""


def default_stride(crop: int) -> int:
    """The official sliding-window step: 2/3 of the crop, rounded up (U2PL ``stride_rate``).

    >>> default_stride(769), default_stride(8)
    (513, 6)
    """
    return -(-2 * int(crop) // 3)


@dataclass(frozen=True)
class EvalProtocol:
    """How a network is evaluated; validated on construction (one-line errors naming the dataset keys).

    Args:
        mode: one of :data:`EVAL_MODES` (``dataset.val_mode``).
        crop_size: centre-crop side or window side (``dataset.val_crop_size``); required by ``center_crop``
            and ``sliding``, unused by ``whole``.
        stride: step between windows (``dataset.val_stride``); None: :func:`default_stride` of the crop.

    >>> EvalProtocol("sliding", 769).describe()
    'sliding window 769x769, stride 513 (2/3 of the crop), over the whole image, overlapping logits averaged'
    >>> EvalProtocol("center_crop", 513).describe()
    'center crop 513x513 (single scale)'
    >>> EvalProtocol.from_dict(EvalProtocol("sliding", 64, 20).as_dict())
    EvalProtocol(mode='sliding', crop_size=64, stride=20)
    """

    mode: str = "whole"
    crop_size: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise BRPGInputError(f"dataset.val_mode={self.mode!r}; expected one of {', '.join(EVAL_MODES)}")
        crop, stride = self.crop_size, self.stride
        if self.mode != "whole" and (crop is None or int(crop) < 1):
            raise BRPGInputError(f"dataset.val_mode={self.mode} needs dataset.val_crop_size >= 1, got {crop}")
        if stride is not None and int(stride) < 1:
            raise BRPGInputError(f"dataset.val_stride={stride}; expected an integer >= 1 or null (2/3 of the crop)")
        # plain ints (YAML and JSON may hand over other integer types), so equality and as_dict are exact
        object.__setattr__(self, "mode", str(self.mode))
        object.__setattr__(self, "crop_size", None if crop is None else int(crop))
        object.__setattr__(self, "stride", None if stride is None else int(stride))

    @classmethod
    def from_dataset(cls, dataset: Mapping[str, Any]) -> EvalProtocol:
        """The protocol a dataset config names: ``val_mode`` (default ``whole``), ``val_crop_size``, ``val_stride``."""
        return cls(dataset.get("val_mode", "whole"), dataset.get("val_crop_size"), dataset.get("val_stride"))

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> EvalProtocol:
        """The inverse of :meth:`as_dict` (``mode``, ``crop_size``, ``stride``; missing keys take the defaults)."""
        return cls(value.get("mode", "whole"), value.get("crop_size"), value.get("stride"))

    def as_dict(self) -> dict[str, Any]:
        """``{"mode", "crop_size", "stride"}`` as plain values: what the checkpoint stores."""
        return {"mode": self.mode, "crop_size": self.crop_size, "stride": self.stride}

    @property
    def window_stride(self) -> int | None:
        """The step the sliding window takes (the stored one, else :func:`default_stride`); None when not sliding."""
        if self.mode != "sliding":
            return None
        return self.stride if self.stride is not None else default_stride(int(self.crop_size))  # type: ignore[arg-type]

    def describe(self) -> str:
        """One line naming the protocol (printed at the start of validation)."""
        crop = self.crop_size
        if self.mode == "sliding":
            step = f"{self.stride}" if self.stride else f"{self.window_stride} (2/3 of the crop)"
            return f"sliding window {crop}x{crop}, stride {step}, over the whole image, overlapping logits averaged"
        if self.mode == "center_crop":
            return f"center crop {crop}x{crop} (single scale)"
        return "whole image (single scale)"


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
        stride = (default_stride(crop_h), default_stride(crop_w))
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
