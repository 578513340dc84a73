"""Which features go into the banks (Sec. 3.4.1, Eq. 8-9) and which points enter ``L_pro`` (Eq. 17-18).

Coordinates are integer crop pixels ``(y, x)`` at the input resolution ``H x W``; feature maps are at
the decoder resolution ``(h, w) = (ceil(H / s), ceil(W / s))`` for stride ``s``. A crop pixel is read from
a map with one of the two geometries of ``models.output.resize_to_input``, named by ``align_corners`` (the
segmentor's output carries it): True (official code) reads map coordinate ``p (h - 1) / (H - 1)``, False
``(p + 0.5) / s - 0.5`` (clamped to the map).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from brpg_lightning.constants import IGNORE_INDEX


def bank_masks(
    probs: Tensor, labels: Tensor | None, eta_s: float | Tensor
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """High / low-confidence pixel masks of CPG (Sec. 3.4.1).

    Labeled (``labels`` given): ``high = (pred == label) & (conf >= eta)``, ``low = (pred == label) &
    (conf < eta)``; pixels labeled ``IGNORE_INDEX`` are never selected. Unlabeled (``labels`` None):
    ``high = conf >= eta`` and ``low`` is None (Eq. 9 samples low-confidence features from labeled
    images only). ``conf`` is the max softmax probability ("confidence probability").

    Args:
        probs: softmax probabilities ``(B, C, h, w)``.
        labels: ground truth at the same resolution ``(B, h, w)`` long, or None.
        eta_s: threshold, a float or per-class thresholds ``(C,)`` read at the label (labeled) or at
            the predicted class (unlabeled) of each pixel (Table 8's class-specific option).

    Returns:
        ``high (B, h, w)`` bool, ``low (B, h, w)`` bool or None, ``pred (B, h, w)`` long,
        ``conf (B, h, w)`` (dtype of ``probs``).

    Example:
        >>> p = torch.tensor([[0.9, 0.6], [0.1, 0.4]]).view(1, 2, 1, 2)
        >>> high, low, pred, conf = bank_masks(p, torch.tensor([[[0, 0]]]), 0.8)
        >>> high.tolist(), low.tolist()
        ([[[True, False]]], [[[False, True]]])
    """
    conf, pred = probs.max(dim=1)
    if isinstance(eta_s, Tensor):
        eta_s = eta_s.to(device=probs.device, dtype=conf.dtype)
        index = pred if labels is None else labels.clamp(0, eta_s.shape[0] - 1)
        eta = eta_s[index]
    else:
        eta = float(eta_s)
    confident = conf >= eta
    if labels is None:
        return confident, None, pred, conf
    correct = (pred == labels) & (labels != IGNORE_INDEX)
    return correct & confident, correct & ~confident, pred, conf


def random_subset(n: int, cap: int, generator: torch.Generator | None = None, device=None) -> Tensor:  # noqa: ANN001
    """``min(n, cap)`` distinct indices of ``range(n)``, a uniform random subset (operator ``S`` of Eq. 8).

    When ``n <= cap`` every index is returned in order (nothing to drop). Random draws use
    ``generator`` (on its own device) when given, and the result is moved to ``device``.

    Example:
        >>> random_subset(3, 5).tolist()
        [0, 1, 2]
        >>> random_subset(10, 4, generator=torch.Generator().manual_seed(0)).unique().numel()
        4
    """
    if n <= cap:
        return torch.arange(n, device=device)
    gen_device = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=gen_device)[:cap].to(device)


def downsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Labels ``(B, H, W)`` to the decoder resolution ``size = (h, w)`` by nearest neighbour
    (``F.interpolate(mode="nearest")``, as the official implementation), ``(B, h, w)`` long.

    Example:
        >>> downsample_labels(torch.arange(16).view(1, 4, 4), (2, 2)).tolist()
        [[[0, 2], [8, 10]]]
    """
    out = F.interpolate(labels.unsqueeze(1).float(), size=tuple(size), mode="nearest")
    return out.squeeze(1).long()


def grid_positions(size: int, grid: int, device=None) -> Tensor:  # noqa: ANN001
    """The ``grid`` crop positions of Eq. (17) along an axis of ``size`` pixels: ``i * ((size - 1) // grid)``.

    The paper fixes the count ("32 x 32 samples in each image") but not where; the official code takes
    ``i * ((H - 1) // 32)`` for ``i < 32`` plus ``H - 1`` (33 x 33 points). Here the paper's count with the
    official positions (without the extra last row and column): at 513, step 16, positions 0, 16, ..., 496;
    at 769, step 24, positions 0, ..., 744. Needs ``size > grid`` (else every position would be 0).

    Example:
        >>> grid_positions(513, 32)[:3].tolist(), grid_positions(513, 32)[-1].item()
        ([0, 16, 32], 496)
    """
    step = (size - 1) // grid
    if step < 1:
        raise ValueError(f"a grid of {grid} points needs more than {grid} pixels per side; got {size}")
    return torch.arange(grid, device=device) * step


def grid_points(batch: int, height: int, width: int, grid: int = 32, device=None) -> Tensor:  # noqa: ANN001
    """Grid sampling of labeled images (Eq. 17): ``grid x grid`` points per image.

    ``y_i = i * ((H - 1) // grid)``, ``x_j = j * ((W - 1) // grid)`` for ``i, j < grid``
    (:func:`grid_positions`: the paper's count at the official code's positions, each axis with its own
    size), row-major (``y`` outer). Returns ``(B, grid * grid, 2)`` long ``(y, x)`` crop coordinates, so
    ``M_l = grid ** 2`` (1024 for ``grid = 32``).

    Example:
        >>> grid_points(1, 9, 9, grid=2).tolist()
        [[[0, 0], [0, 4], [4, 0], [4, 4]]]
    """
    ys, xs = grid_positions(height, grid, device), grid_positions(width, grid, device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)
    return coords.unsqueeze(0).expand(batch, -1, -1).contiguous()


def random_points(
    candidates: Tensor, num: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random sampling of unlabeled images (Eq. 18): up to ``num`` distinct candidate pixels per image.

    Uniform without replacement among the True pixels of ``candidates (B, H, W)`` (e.g. pseudo-label
    confidence ``>= eta_t``), via random keys and ``topk`` (no per-pixel loop). An image with fewer
    than ``num`` candidates gets all of them; the remaining rows are marked invalid (their
    coordinates are ``(0, 0)``, safe to index).

    Returns:
        ``coords (B, num, 2)`` long ``(y, x)`` and ``valid (B, num)`` bool.

    Example:
        >>> cand = torch.zeros(1, 3, 3, dtype=torch.bool); cand[0, 1, 2] = True
        >>> coords, valid = random_points(cand, 2)
        >>> coords[valid].tolist(), valid.tolist()
        ([[1, 2]], [[True, False]])
    """
    b, h, w = candidates.shape
    device = candidates.device
    gen_device = generator.device if generator is not None else device
    keys = torch.rand(b, h * w, generator=generator, device=gen_device).to(device)
    keys = keys.masked_fill(~candidates.reshape(b, h * w), -1.0)  # non-candidates sort last
    k = min(num, h * w)
    top, idx = keys.topk(k, dim=1)
    valid = top >= 0
    idx = idx.masked_fill(~valid, 0)
    coords = torch.stack([idx // w, idx % w], dim=-1)
    if k < num:
        coords = torch.cat([coords, coords.new_zeros(b, num - k, 2)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(b, num - k)], dim=1)
    return coords, valid


SPARSE_DEVICES = frozenset({"cpu"})
"""Device types where :func:`sample_points` reads points by a sparse interpolation matrix product
(forward and backward several times faster than ``grid_sample`` on the CPU); elsewhere ``grid_sample``."""


def map_coordinates(
    pix: Tensor, size_in: int | None, size_map: int, stride: int, align_corners: bool
) -> Tensor:
    """Float64 map coordinates at which crop pixels ``pix`` (one axis) are read, clamped to the map.

    ``align_corners=True``: ``pix (size_map - 1) / (size_in - 1)`` (``F.interpolate(size=..., align_corners=
    True)``; 0 for a one-pixel input); False: ``(pix + 0.5) / stride - 0.5`` (bilinear upsampling by
    ``stride``), clamped to ``[0, size_map - 1]`` as ``grid_sample``'s ``border`` padding.

    Example:
        >>> p = torch.tensor([0, 1, 4, 512])
        >>> map_coordinates(p, 513, 129, 4, align_corners=True).tolist()
        [0.0, 0.25, 1.0, 128.0]
        >>> map_coordinates(p, 513, 129, 4, align_corners=False).tolist()
        [0.0, 0.0, 0.625, 127.625]
    """
    pos = pix.to(torch.float64)
    if align_corners:
        if size_in is None:
            raise ValueError("align_corners=True reads need the input size (size=(H, W))")
        pos = pos * ((size_map - 1) / (size_in - 1)) if size_in > 1 else torch.zeros_like(pos)
    else:
        pos = (pos + 0.5) / stride - 0.5
    return pos.clamp(0, size_map - 1)


def _sizes(size: tuple[int, int] | None) -> tuple[int | None, int | None]:
    return (None, None) if size is None else (int(size[0]), int(size[1]))


def _bilinear_matrix(
    coords: Tensor, stride: int, b: int, h: int, w: int, dtype: torch.dtype, align_corners: bool,
    size: tuple[int, int] | None,
) -> Tensor:
    """Sparse CSR ``(B*M, B*h*w)``: row ``(b, m)`` holds the 4 bilinear weights of point ``coords[b, m]``
    on the pixels of image ``b`` of a ``(B, h, w)`` map, at the map coordinates of :func:`map_coordinates`."""
    device = coords.device
    m = coords.shape[1]
    size_h, size_w = _sizes(size)
    y = map_coordinates(coords[..., 0], size_h, h, stride, align_corners)
    x = map_coordinates(coords[..., 1], size_w, w, stride, align_corners)
    y0, x0 = y.floor().long(), x.floor().long()
    y1, x1 = (y0 + 1).clamp_max(h - 1), (x0 + 1).clamp_max(w - 1)
    fy, fx = y - y0, x - x0
    base = (torch.arange(b, device=device) * (h * w)).view(b, 1, 1)
    cols = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], -1) + base
    vals = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], -1).to(dtype)
    crow = torch.arange(0, b * m * 4 + 1, 4, device=device)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols.reshape(-1), vals.reshape(-1), (b * m, b * h * w))


def sample_points(
    fmap: Tensor, coords: Tensor, stride: int, align_corners: bool = False, size: tuple[int, int] | None = None
) -> Tensor:
    """Features at crop pixels, read bilinearly from the decoder-resolution map (Eq. 17-18 inputs).

    Equals ``resize_to_input(fmap, size, stride, align_corners=align_corners)[b, :, y, x]`` up to float
    rounding, without materialising the ``(B, D, H, W)`` map: the map is read at the coordinates of
    :func:`map_coordinates`, ``(y (h - 1) / (H - 1), x (w - 1) / (W - 1))`` with ``align_corners=True`` (the
    official code's upsampling; ``size = (H, W)`` required), ``((y + 0.5) / stride - 0.5, (x + 0.5) / stride -
    0.5)`` clamped to the map with False (``size`` not needed). Pass the geometry of the output the map
    comes from (``SegmentorOutput.align_corners``).

    On :data:`SPARSE_DEVICES` the weights are applied as a sparse ``(B*M, B*h*w)`` matrix (4 entries a row)
    times the ``(B*h*w, D)`` pixels: ``grid_sample``'s CPU backward scatters point by point and channel by
    channel and was the largest single cost of BRPG's prototype stage in the default run; the sparse
    product and its transpose are about 2.4x faster forward and backward at 8 x 1000 points of 256
    channels. Written by hand for that reason; the ``grid_sample`` path
    (:func:`sample_points_grid_sample`) stays the reference (tests compare both).

    Args:
        fmap: ``(B, D, h, w)`` feature map (gradients flow back to it).
        coords: ``(B, M, 2)`` long ``(y, x)`` crop coordinates.
        stride: input pixels per map pixel.
        align_corners: the geometry (see above).
        size: the input size ``(H, W)`` the coordinates refer to (needed with ``align_corners=True``).

    Returns:
        ``(B, M, D)`` in ``fmap``'s dtype, float32 for a 16-bit map (read in float32).

    Example:
        >>> fmap = torch.arange(4.0).view(1, 1, 2, 2)
        >>> pts = torch.tensor([[[0, 0], [3, 4], [7, 7]]])
        >>> sample_points(fmap, pts, stride=4).flatten().tolist()
        [0.0, 1.375, 3.0]
        >>> pts = torch.tensor([[[0, 0], [3, 3], [6, 6]]])  # a 7 x 7 input: map coordinates p / 6
        >>> sample_points(fmap, pts, stride=4, align_corners=True, size=(7, 7)).flatten().tolist()
        [0.0, 1.5, 3.0]
    """
    if fmap.dtype in (torch.float16, torch.bfloat16):  # 16-bit grid coordinates would be off by ~0.5 px
        fmap = fmap.float()
    if fmap.device.type in SPARSE_DEVICES:
        b, d, h, w = fmap.shape
        weights = _bilinear_matrix(coords, stride, b, h, w, fmap.dtype, align_corners, size)
        pixels = fmap.permute(0, 2, 3, 1).reshape(b * h * w, d)
        with torch.autocast(fmap.device.type, enabled=False):  # no 16-bit sparse matmul (CPU bf16 autocast)
            return (weights @ pixels).view(b, coords.shape[1], d)
    return sample_points_grid_sample(fmap, coords, stride, align_corners, size)


def sample_points_grid_sample(
    fmap: Tensor, coords: Tensor, stride: int, align_corners: bool = False, size: tuple[int, int] | None = None
) -> Tensor:
    """:func:`sample_points` by ``F.grid_sample`` (the path off :data:`SPARSE_DEVICES`, and the reference).

    Normalised positions: ``g = 2 p / (H - 1) - 1`` with ``align_corners=True`` (``grid_sample`` then reads
    ``(g + 1) / 2 (h - 1) = p (h - 1) / (H - 1)``), ``g = (2 p + 1) / (stride h) - 1`` with False.
    """
    h, w = fmap.shape[-2:]
    if fmap.dtype in (torch.float16, torch.bfloat16):
        fmap = fmap.float()
    pos = coords.to(fmap.dtype)
    if align_corners:
        size_h, size_w = _sizes(size)
        if size_h is None:
            raise ValueError("align_corners=True reads need the input size (size=(H, W))")
        gy = 2.0 * pos[..., 0] / max(size_h - 1, 1) - 1.0
        gx = 2.0 * pos[..., 1] / max(size_w - 1, 1) - 1.0
    else:
        gy = (2.0 * pos[..., 0] + 1.0) / (stride * h) - 1.0
        gx = (2.0 * pos[..., 1] + 1.0) / (stride * w) - 1.0
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(2)  # (B, M, 1, 2), (x, y) order
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=align_corners)
    return out.squeeze(3).transpose(1, 2)  # (B, D, M, 1) -> (B, M, D)


def _interp_matrix(
    n_out: int, size_in: int, size_map: int, stride: int, dtype: torch.dtype, device, align_corners: bool  # noqa: ANN001
) -> Tensor:
    """``(n_out, size_map)`` bilinear weights of the ``n_out`` grid positions of Eq. (17) along one axis.

    Grid position ``i`` is the crop pixel ``p = i * ((size_in - 1) // n_out)`` (:func:`grid_positions`),
    read at the map coordinate ``v`` of :func:`map_coordinates`: weight ``1 - frac(v)`` on ``floor(v)`` and
    ``frac(v)`` on the next row.
    """
    steps = torch.arange(n_out, device=device)
    v = map_coordinates(grid_positions(size_in, n_out, device), size_in, size_map, stride, align_corners)
    lo = v.floor().long()
    hi = (lo + 1).clamp_max(size_map - 1)
    frac = v - lo
    weights = torch.zeros(n_out, size_map, dtype=torch.float64, device=device)
    weights[steps, lo] += 1.0 - frac
    weights[steps, hi] += frac
    return weights.to(dtype)


def sample_grid(
    fmap: Tensor, height: int, width: int, grid: int, stride: int, align_corners: bool = False
) -> Tensor:
    """``sample_points(fmap, grid_points(B, height, width, grid), stride, align_corners, (height, width))``
    by two small matrix products.

    Bilinear reading at the points of a regular grid is separable in either geometry: ``out = W_y F W_x^T``
    per image and channel, with the ``(grid, h)`` and ``(grid, w)`` weight matrices of :func:`_interp_matrix`.
    Forward and backward are then BLAS products instead of ``grid_sample`` and its CPU backward, a
    scatter over every point and channel (several times slower at BRPG's sizes: 8 x 1024 points of
    256 channels; ``benchmarks/bench_point_sampling.py``). Written by hand for that reason.

    Returns:
        ``(B, grid * grid, D)`` in :func:`grid_points`' row-major order (gradients flow to ``fmap``).

    Example:
        >>> fmap = torch.randn(2, 3, 5, 6)
        >>> ref = sample_points(fmap, grid_points(2, 20, 24, 4), stride=4, align_corners=True, size=(20, 24))
        >>> torch.allclose(sample_grid(fmap, 20, 24, 4, stride=4, align_corners=True), ref, atol=1e-6)
        True
    """
    b, d, h, w = fmap.shape
    if fmap.dtype in (torch.float16, torch.bfloat16):
        fmap = fmap.float()
    wy = _interp_matrix(grid, height, h, stride, fmap.dtype, fmap.device, align_corners)
    wx = _interp_matrix(grid, width, w, stride, fmap.dtype, fmap.device, align_corners)
    pixels = fmap.permute(0, 2, 3, 1)  # (B, h, w, D): the result comes out contiguous as (B, grid*grid, D)
    rows = torch.matmul(wx, pixels)  # (B, h, grid, D): along x
    out = torch.matmul(wy, rows.reshape(b, h, grid * d))  # (B, grid, grid * D): along y
    return out.view(b, grid * grid, d)


def gather_points(maps: Tensor, coords: Tensor) -> Tensor:
    """``maps[b, y, x]`` for ``maps (B, H, W)`` at ``coords (B, M, 2)`` -> ``(B, M)`` (labels, confidences).

    Example:
        >>> gather_points(torch.arange(6).view(1, 2, 3), torch.tensor([[[1, 2], [0, 1]]])).tolist()
        [[5, 1]]
    """
    b, _, w = maps.shape
    flat = coords[..., 0] * w + coords[..., 1]
    return maps.reshape(b, -1).gather(1, flat)
