"""CutMix for the unlabeled strong view (U2PL ``generate_cutmix_mask`` / ``generate_unsup_data``).

Image ``i`` receives, inside its own box, the content of image ``(i + 1) % B``; every other per-pixel
map of the batch (pseudo-labels, confidences, valid masks, logits) is mixed with the same boxes, so
each pixel of every output comes from one source image.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[low, high)``."""
    return int(torch.randint(low, high, (1,), generator=generator).item())


def cutmix_box(
    height: int, width: int, generator: torch.Generator | None = None, area_ratio: float = 0.5
) -> Tensor:
    """Random box mask ``(H, W)`` bool covering about ``area_ratio * H * W`` pixels (U2PL).

    ``w`` is uniform in ``[int(W * area_ratio) + 1, W)`` (``W`` itself when that range is empty, for
    tiny sizes), ``h = round(H * W * area_ratio / w)`` clipped to ``[0, H]``, and the top-left corner
    is uniform over the positions where the box fits.

    Example:
        >>> box = cutmix_box(8, 8, torch.Generator().manual_seed(0))
        >>> box.shape, box.dtype, 24 <= int(box.sum()) <= 40
        (torch.Size([8, 8]), torch.bool, True)
    """
    if height < 1 or width < 1:
        raise ValueError(f"cutmix_box needs a positive size, got {(height, width)}")
    cut_area = height * width * area_ratio
    low = int(width * area_ratio) + 1
    w = _randint(low, width, generator) if low < width else width
    h = min(max(round(cut_area / w), 0), height)
    top = _randint(0, height - h + 1, generator)
    left = _randint(0, width - w + 1, generator)
    box = torch.zeros(height, width, dtype=torch.bool)
    box[top : top + h, left : left + w] = True
    return box


def mix_like(x: Tensor, boxes: Tensor) -> Tensor:
    """``x`` ``(B, H, W)`` or ``(B, C, H, W)`` with pixels inside ``boxes[i]`` taken from ``x[(i + 1) % B]``."""
    mask = boxes if x.ndim == 3 else boxes.unsqueeze(1)
    return torch.where(mask, torch.roll(x, shifts=-1, dims=0), x)


def apply_cutmix(
    images: Tensor, *maps: Tensor, p: float = 0.5, generator: torch.Generator | None = None
) -> tuple[Tensor, ...]:
    """CutMix a batch with probability ``p`` (one coin flip per batch).

    Args:
        images: ``(B, 3, H, W)``.
        *maps: per-pixel maps of the same batch, each ``(B, H, W)`` or ``(B, C, H, W)``.
        p: probability that the batch is mixed.
        generator: CPU random generator for the coin and the boxes (reproducible when seeded).

    Returns:
        ``(mixed_images, *mixed_maps, boxes)``; ``boxes (B, H, W)`` bool marks the pixels of image
        ``i`` that come from image ``(i + 1) % B``. Without mixing the inputs come back unchanged and
        ``boxes`` is all ``False``. ``B == 1`` pastes the image into itself.

    Example:
        >>> x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 4, 4)
        >>> mixed, boxes = apply_cutmix(x, p=1.0, generator=torch.Generator().manual_seed(0))
        >>> bool((mixed[0, 0] == boxes[0].float()).all())
        True
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    batch, _, height, width = images.shape
    for m in maps:
        if m.ndim not in (3, 4) or m.shape[0] != batch or tuple(m.shape[-2:]) != (height, width):
            raise ValueError(
                f"cutmix map of shape {tuple(m.shape)} does not match images {tuple(images.shape)}"
            )
    fire = bool(torch.rand((), generator=generator) < p)
    if not fire:
        boxes = torch.zeros(batch, height, width, dtype=torch.bool, device=images.device)
        return (images, *maps, boxes)
    boxes = torch.stack([cutmix_box(height, width, generator) for _ in range(batch)]).to(images.device)
    return (mix_like(images, boxes), *(mix_like(m, boxes) for m in maps), boxes)
