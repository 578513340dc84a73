"""What a segmentor returns, and how decoder-resolution maps go back to input resolution."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

FEATURE_SOURCES = ("features", "logits", "decoder")
"""Names of the maps a :class:`SegmentorOutput` carries (BRPG's feature source, paper Table 9)."""


class SegmentorOutput:
    """One forward pass of a :class:`~brpg_lightning.models.segmentor.Segmentor`.

    All three maps are at the decoder's resolution ``(h, w) = (ceil(H / stride), ceil(W / stride))``
    for an input of size ``(H, W)``; :meth:`logits_at` (or :meth:`upsample` for any map of this
    resolution) brings them to ``(H, W)`` with the geometry the segmentor was built with, so the
    geometry travels with the output to every loss, pseudo-label and point read.

    Attributes:
        logits: classification head output, ``(B, C, h, w)``.
        features: feature head output (paper Sec. 4.1.3, 256-d by default), ``(B, D, h, w)``. It may
            be given as a zero-argument callable (the segmentor does so in eval mode): it is then
            computed on first access and kept, and never computed when nothing reads it.
        decoder: the decoder's shared features both heads read, ``(B, D_dec, h, w)``.
        stride: input pixels per decoder pixel (4 for DeepLabV3+ and SegFormer).
        align_corners: how a map is read at input resolution (:func:`resize_to_input`): True, the
            official code's ``F.interpolate(..., align_corners=True)`` to the input size (crop pixel
            ``p`` reads map coordinate ``p (h - 1) / (H - 1)``); False, bilinear by the exact stride
            (``(p + 0.5) / stride - 0.5``).
    """

    def __init__(
        self,
        logits: Tensor,
        features: Tensor | Callable[[], Tensor],
        decoder: Tensor,
        stride: int,
        align_corners: bool = False,
    ) -> None:
        self.logits, self._features, self.decoder, self.stride = logits, features, decoder, stride
        self.align_corners = bool(align_corners)

    @property
    def features(self) -> Tensor:
        if callable(self._features):
            self._features = self._features()
        return self._features

    @features.setter
    def features(self, value: Tensor | Callable[[], Tensor]) -> None:
        self._features = value

    @property
    def features_computed(self) -> bool:
        """False while ``features`` is a callable that nothing has read yet."""
        return not callable(self._features)

    def __repr__(self) -> str:
        feats = tuple(self._features.shape) if self.features_computed else "lazy"
        return (
            f"SegmentorOutput(logits={tuple(self.logits.shape)}, features={feats}, stride={self.stride}, "
            f"align_corners={self.align_corners})"
        )

    def select(self, source: str) -> Tensor:
        """The map named ``source`` (one of :data:`FEATURE_SOURCES`)."""
        if source not in FEATURE_SOURCES:
            raise ValueError(f"feature source {source!r} is not one of {FEATURE_SOURCES}")
        return getattr(self, source)

    def upsample(self, x: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
        """A map at this output's resolution (its logits, a detached or averaged copy, ...) at the input
        size ``size``, read with this output's geometry (:func:`resize_to_input`)."""
        return resize_to_input(x, tuple(size), self.stride, mode=mode, align_corners=self.align_corners)

    def logits_at(self, size: tuple[int, int]) -> Tensor:
        """``logits`` upsampled to the input size ``size`` ``(H, W)`` with this output's geometry."""
        return self.upsample(self.logits, size)

    def detach(self) -> SegmentorOutput:
        """The same maps cut from the autograd graph (lazy features stay lazy)."""
        feats = self._features.detach() if self.features_computed else (lambda: self.features.detach())
        return SegmentorOutput(
            self.logits.detach(), feats, self.decoder.detach(), self.stride, align_corners=self.align_corners
        )

    def split(self, sizes: list[int]) -> list[SegmentorOutput]:
        """Split along the batch dimension (a joint forward of labeled + unlabeled images).

        Lazy features stay lazy: the first part read computes the whole batch's features once.
        """
        logits, decoder = self.logits.split(sizes), self.decoder.split(sizes)
        if self.features_computed:
            feats: list = list(self._features.split(sizes))
        else:
            feats = [lambda i=i: self.features.split(sizes)[i] for i in range(len(sizes))]
        return [
            SegmentorOutput(lo, fe, de, self.stride, align_corners=self.align_corners)
            for lo, fe, de in zip(logits, feats, decoder, strict=True)
        ]


def resize_to_input(
    x: Tensor, size: tuple[int, int], stride: int, mode: str = "bilinear", align_corners: bool = False
) -> Tensor:
    """Upsample a decoder-resolution map ``(B, C, h, w)`` to the input size ``(H, W)``.

    ``align_corners=True`` (the official code's geometry, and the segmentors' default): one
    ``F.interpolate(x, size=size, mode=mode, align_corners=True)`` straight to the input size, so a pixel
    ``(y, x)`` of the result reads the map at ``(y (h - 1) / (H - 1), x (w - 1) / (W - 1))`` (``stride`` is
    not used; at 513 and 769 with stride 4 that is ``(y / 4, x / 4)``, the corners of both grids aligned).

    ``align_corners=False``: interpolates by the exact factor ``stride`` (``align_corners=False``) and crops
    to ``size``, so a pixel reads the map at ``((y + 0.5) / stride - 0.5, (x + 0.5) / stride - 0.5)``, the
    same geometry as the un-padded forward.

    Bilinear point sampling (``brpg.sampling.sample_points``, ``sample_grid``) reproduces either geometry
    without materialising the upsampled map. Modes without corners (``nearest``) ignore the flag's
    interpolation rule but keep its sizing (to ``size`` directly, or by ``stride`` then cropped).

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> resize_to_input(x, (7, 7), stride=4).shape
        torch.Size([1, 1, 7, 7])
        >>> resize_to_input(x, (5, 5), stride=4, align_corners=True)[0, 0, 0].tolist()  # 0 to 1 in 4 steps
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    corners = mode in ("linear", "bilinear", "bicubic", "trilinear")
    if align_corners:
        return F.interpolate(x, size=tuple(size), mode=mode, **({"align_corners": True} if corners else {}))
    h, w = x.shape[-2:]
    if h * stride < size[0] or w * stride < size[1]:
        raise ValueError(f"map {tuple(x.shape[-2:])} x stride {stride} does not cover size {size}")
    up = F.interpolate(x, scale_factor=stride, mode=mode, **({"align_corners": False} if corners else {}))
    return up[..., : size[0], : size[1]]


def as_probabilities(logits: Tensor) -> Tensor:
    """Softmax over the class dimension in float32 (safe under 16-bit autocast)."""
    return torch.softmax(logits.float(), dim=1)
