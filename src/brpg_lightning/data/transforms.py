"""Weak, strong and validation transforms on albumentations (OpenCV kernels on ``(H, W, 3)`` uint8 arrays).

* Weak (labeled and unlabeled; paper Sec. 4.1.5, following U2PL): ``RandomScale`` by a factor in
  ``scale_range`` (image bilinear, mask nearest — ``INTER_NEAREST_EXACT``, PIL's pixel-centre rule),
  ``HorizontalFlip`` with ``flip_p``, ``PadIfNeeded`` at the bottom/right (image 0, mask 255 =
  ``IGNORE_INDEX``, ``valid`` False) and ``RandomCrop`` to ``crop_size``.
* Strong (unlabeled only; UniMatch): on the weak crop (same geometry): ``ColorJitter`` with ``p=0.8``
  (brightness 0.5, contrast 0.5, saturation 0.5, hue 0.25), ``ToGray`` ``p=0.2`` (ITU-R 601 weights), Gaussian
  blur ``p=0.5`` with sigma uniform in ``[0.1, 2.0]`` (kernel ``2 * int(3.5 sigma) + 1``, reflect-101 border).
  The strong view is uint8 like the weak one. CutMix is a batch operation of the method, not here.
* Val: what the evaluation protocol (``models.inference.EvalProtocol``) asks of the data: ``center_crop`` to
  its crop (padding bottom/right first, image 0 and mask 255, when the image is smaller), else the whole image
  (``whole``; ``sliding`` is whole-image data evaluated window by window in the module,
  ``models.inference.sliding_window_logits``).

Every image is then scaled to ``[0, 1]`` and normalised with the ImageNet mean/std -> float32 ``(3, H, W)``;
masks become int64 ``(H, W)``. All randomness comes from torch's global RNG (seeded per worker by torch and
by ``seed_everything(workers=True)``): every call seeds the albumentations pipeline with a number drawn from
it, so ``torch.manual_seed`` reproduces an item and workers never share a stream.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor

from brpg_lightning.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import EvalProtocol

_SEED_HIGH = 2**31 - 1


def _seeded(pipeline: A.Compose) -> A.Compose:
    """``pipeline`` reseeded from torch's global RNG (one draw)."""
    pipeline.set_random_seed(int(torch.randint(0, _SEED_HIGH, ()).item()))
    return pipeline


# --------------------------------------------------------------------------- pure helpers
def pad_bottom_right(
    image: np.ndarray, mask: np.ndarray | None, height: int, width: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Pad to at least ``height x width`` at the bottom/right: image 0, mask ``IGNORE_INDEX``.

    Returns the padded image, mask and the ``valid`` bool map (False on padding).

    >>> img, m, valid = pad_bottom_right(np.ones((2, 3, 3), np.uint8), np.zeros((2, 3), np.uint8), 3, 2)
    >>> img.shape, m[:, 0].tolist(), valid[:, 0].tolist()
    ((3, 3, 3), [0, 0, 255], [True, True, False])
    """
    h, w = image.shape[:2]
    ph, pw = max(height - h, 0), max(width - w, 0)
    valid = np.ones((h + ph, w + pw), dtype=bool)
    if ph == 0 and pw == 0:
        return image, mask, valid
    valid[h:, :] = False
    valid[:, w:] = False
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
    if mask is not None:
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    return image, mask, valid


def to_normalized_tensor(image: np.ndarray | Tensor) -> Tensor:
    """``(H, W, 3)`` uint8 array (or ``(3, H, W)`` float tensor in [0, 1]) -> ImageNet-normalised float32
    ``(3, H, W)``: ``(x / 255 - mean) / std``.

    >>> x = to_normalized_tensor(np.full((1, 1, 3), 255, np.uint8))
    >>> x.shape, x.dtype, torch.allclose(x.flatten(), torch.tensor([(1 - 0.485) / 0.229,
    ...     (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))
    (torch.Size([3, 1, 1]), torch.float32, True)
    """
    x = to_unit_tensor(image) if isinstance(image, np.ndarray) else image
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).float()


def to_unit_tensor(image: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 -> float32 ``(3, H, W)`` in ``[0, 1]``."""
    return torch.tensor(np.ascontiguousarray(image), dtype=torch.float32).permute(2, 0, 1).div(255.0).contiguous()


def mask_to_tensor(mask: np.ndarray) -> Tensor:
    """``(H, W)`` uint8 -> int64 ``(H, W)``."""
    return torch.tensor(np.ascontiguousarray(mask), dtype=torch.int64)


# --------------------------------------------------------------------------- weak geometry
class WeakGeometry:
    """Random rescale, horizontal flip, random crop (with padding) shared by labeled and unlabeled items.

    Args:
        crop_size: output side ``S``.
        scale_range: ``(low, high)`` rescale factor range (paper: 0.5-2.0).
        flip_p: horizontal flip probability (paper: 0.5).
    """

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), flip_p: float = 0.5) -> None:
        low, high = (float(v) for v in scale_range)
        if int(crop_size) < 1 or not 0 < low <= high or not 0.0 <= float(flip_p) <= 1.0:
            raise BRPGInputError(
                f"weak transform crop_size={crop_size}, scale_range={list(scale_range)}, flip_p={flip_p}; "
                f"expected crop_size >= 1, 0 < low <= high, 0 <= flip_p <= 1"
            )
        self.crop_size, self.scale_range, self.flip_p = int(crop_size), (low, high), float(flip_p)
        s = self.crop_size
        self.pipeline = A.Compose([
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=cv2.INTER_NEAREST_EXACT, p=1.0),
            A.HorizontalFlip(p=self.flip_p),
            A.PadIfNeeded(min_height=s, min_width=s, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                          fill=0, fill_mask=IGNORE_INDEX),
            A.RandomCrop(height=s, width=s),
        ])

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(image (S, S, 3) uint8, mask (S, S) uint8 or None, valid (S, S) bool)``."""
        ones = np.ones(image.shape[:2], np.uint8)  # padded to 255 -> valid is False there
        masks = [ones] if mask is None else [mask, ones]
        out = _seeded(self.pipeline)(image=image, masks=masks)
        valid = out["masks"][-1] == 1
        return out["image"], (None if mask is None else out["masks"][0]), valid


class StrongColor:
    """UniMatch's strong colour view on a ``(H, W, 3)`` uint8 array (geometry unchanged).

    Args:
        color_jitter_p: probability of ColorJitter (0.8).
        brightness, contrast, saturation, hue: ColorJitter strengths (0.5, 0.5, 0.5, 0.25).
        grayscale_p: grey-world probability (0.2), ITU-R 601 weights, 3 channels.
        blur_p: Gaussian blur probability (0.5).
        blur_sigma: ``(low, high)`` blur sigma range in pixels (0.1-2.0); kernel side ``2 * int(3.5 sigma) + 1``.
    """

    def __init__(
        self,
        color_jitter_p: float = 0.8,
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
        hue: float = 0.25,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        for key, p in (("color_jitter_p", color_jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
            if not 0.0 <= float(p) <= 1.0:
                raise BRPGInputError(f"strong.{key}={p}; expected a probability in [0, 1]")
        self.color_jitter_p, self.grayscale_p, self.blur_p = float(color_jitter_p), float(grayscale_p), float(blur_p)
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        self.pipeline = A.Compose([
            A.ColorJitter(brightness=float(brightness), contrast=float(contrast), saturation=float(saturation),
                          hue=float(hue), p=self.color_jitter_p),
            A.ToGray(num_output_channels=3, method="weighted_average", p=self.grayscale_p),
            A.GaussianBlur(blur_limit=0, sigma_limit=self.blur_sigma, p=self.blur_p),
        ])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(_seeded(self.pipeline)(image=image)["image"])


# --------------------------------------------------------------------------- item transforms
class LabeledTransform:
    """Weak view of a labeled item -> ``{"image": float32 (3, S, S), "mask": int64 (S, S)}``."""

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), flip_p: float = 0.5) -> None:
        self.weak = WeakGeometry(crop_size, scale_range, flip_p)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> dict[str, Any]:
        if mask is None:
            raise ValueError("LabeledTransform needs a mask")
        image, mask, _ = self.weak(image, mask)
        return {"image": to_normalized_tensor(image), "mask": mask_to_tensor(mask)}


class UnlabeledTransform:
    """Weak and strong views of an unlabeled item (same crop).

    Returns ``{"image": float32 (3, S, S) weak, "image_strong": float32 (3, S, S), "valid": bool (S, S)}``
    where ``valid`` is False on padded pixels; with ``strong_views=2`` also ``"image_strong2"``, a second
    independent strong draw of the same crop (UniMatch's two strong views).

    Args:
        crop_size, scale_range, flip_p: see :class:`WeakGeometry`.
        strong: keyword arguments of :class:`StrongColor`.
        strong_views: 1 or 2 strong views per item (the method's ``strong_views``).
    """

    def __init__(
        self,
        crop_size: int,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip_p: float = 0.5,
        strong: dict[str, Any] | None = None,
        strong_views: int = 1,
    ) -> None:
        if int(strong_views) not in (1, 2):
            raise ValueError(f"strong_views={strong_views}; expected 1 or 2")
        self.weak = WeakGeometry(crop_size, scale_range, flip_p)
        self.strong = StrongColor(**dict(strong or {}))
        self.strong_views = int(strong_views)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
        image, mask, valid = self.weak(image, mask)
        item = {
            "image": to_normalized_tensor(image),
            "image_strong": to_normalized_tensor(self.strong(image)),
            "valid": torch.tensor(np.ascontiguousarray(valid), dtype=torch.bool),
        }
        if self.strong_views == 2:
            item["image_strong2"] = to_normalized_tensor(self.strong(image))
        if mask is not None:  # the oracle diagnostic's hidden true mask, same geometry as the weak view
            item["mask"] = mask_to_tensor(mask)
        return item


class ValTransform:
    """Validation item -> ``{"image": float32 (3, H, W), "mask": int64 (H, W)}``.

    Args:
        protocol: the evaluation protocol (default: whole image). ``center_crop``: pad bottom/right to at least
            its crop, image 0 / mask 255, then take the centred ``crop x crop`` window; ``whole`` and
            ``sliding``: the image unchanged (the module runs the windows).
    """

    def __init__(self, protocol: EvalProtocol | None = None) -> None:
        self.protocol = protocol if protocol is not None else EvalProtocol()

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> dict[str, Any]:
        if self.protocol.mode == "center_crop":
            s = int(self.protocol.crop_size)  # type: ignore[arg-type]
            image, mask, _ = pad_bottom_right(image, mask, s, s)
            h, w = image.shape[:2]
            y0, x0 = (h - s) // 2, (w - s) // 2
            image = image[y0 : y0 + s, x0 : x0 + s]
            mask = None if mask is None else mask[y0 : y0 + s, x0 : x0 + s]
        item: dict[str, Any] = {"image": to_normalized_tensor(image)}
        if mask is not None:
            item["mask"] = mask_to_tensor(mask)
        return item
