"""Unlabeled points of ``L_pro^u`` drawn from the whole batch (the official implementation's Eq. 18 option).

The paper samples ``M_u`` points per unlabeled image (Eq. 18, :func:`brpg.sampling.random_points`).
The official code pools the candidate pixels of the whole batch and draws ``B_u * M_u`` of them, so an
image with many confident pixels may give more than ``M_u`` points and one with few gives fewer.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pooled_random_points(
    candidates: Tensor, num_per_image: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Up to ``B * num_per_image`` distinct candidate pixels drawn uniformly from the whole batch.

    All True pixels of ``candidates (B, H, W)`` form one pool; when it holds at least
    ``B * num_per_image`` pixels, that many are drawn uniformly without replacement, otherwise every
    candidate is taken (the official rule). The points are returned per image, as
    :func:`brpg.sampling.random_points` returns them, so they are read the same way: image ``b``'s
    points fill the first rows of ``coords[b]``, padded to the largest per-image count ``K`` with
    invalid rows at ``(0, 0)`` (``K >= 1``). ``K`` is data dependent (one host synchronisation).

    Returns:
        ``coords (B, K, 2)`` long ``(y, x)`` and ``valid (B, K)`` bool, ``valid.sum() =
        min(candidates.sum(), B * num_per_image)``.

    Example:
        >>> cand = torch.zeros(2, 2, 2, dtype=torch.bool); cand[0] = True
        >>> coords, valid = pooled_random_points(cand, 2)
        >>> valid.sum(1).tolist(), sorted(map(tuple, coords[0][valid[0]].tolist()))
        ([4, 0], [(0, 0), (0, 1), (1, 0), (1, 1)])
    """
    b, h, w = candidates.shape
    device = candidates.device
    gen_device = generator.device if generator is not None else device
    keys = torch.rand(b * h * w, generator=generator, device=gen_device).to(device)
    keys = keys.masked_fill(~candidates.reshape(-1), -1.0)  # non-candidates sort last
    top, flat = keys.topk(min(b * num_per_image, b * h * w))
    flat = flat[top >= 0]
    image, pixel = flat // (h * w), flat % (h * w)
    per_image = torch.bincount(image, minlength=b)
    k = max(1, int(per_image.max()))  # one row at least: an empty batch reads one invalid point
    # row of each point within its image: its rank among the same image's points
    order = torch.argsort(image, stable=True)
    image, pixel = image[order], pixel[order]
    starts = torch.cumsum(per_image, 0) - per_image
    row = torch.arange(image.numel(), device=device) - starts[image]
    coords = torch.zeros(b, k, 2, dtype=torch.long, device=device)
    valid = torch.zeros(b, k, dtype=torch.bool, device=device)
    coords[image, row] = torch.stack([pixel // w, pixel % w], dim=-1)
    valid[image, row] = True
    return coords, valid
