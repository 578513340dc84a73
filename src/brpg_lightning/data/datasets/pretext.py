"""A pretext image pool for pretraining the encoder offline: shapes and textures the benchmark never uses.

The paper starts every network from ImageNet weights; offline, the embedded benchmark's analogue is an encoder
pretrained once on this pool (``models/pretext.py``). The pool carries no information about the benchmark's
classes or masks BY CONSTRUCTION:

- its shape families (:data:`PRETEXT_SHAPES`: star, amoeba, heart, snake) and texture patterns
  (:data:`PRETEXT_TEXTURES`: angular sectors, a spiral, thresholded blobs, linear ramp) are disjoint
  from the synthetic benchmark's (``disc, square, triangle, ring, cross, bar`` x ``stripes, checker, dots,
  grid, grain, solid``), and this module draws them with its own code (it imports nothing from
  ``synthetic.py``);
- its backgrounds are its own (smooth colour noise only; no gradient, no faint distractor patterns);
- it is drawn from its own random streams (``numpy.random.default_rng([seed, 7 or 8, i])``), never written into a
  dataset folder, and holds no benchmark image.

What it shares with the benchmark is only what ImageNet shares with PASCAL: natural-ish image statistics
(objects with edges and patterns on a background). Each item has two dense targets: the pretext shape id
(0 = background, 1..4) and the pretext texture id (0 = background, 1..4) of every pixel.

Determinism: image ``i`` uses ``default_rng([seed, 7, i])`` (held-out images ``[seed, 8, i]``); the same
arguments give identical arrays.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

PRETEXT_SHAPES: tuple[str, ...] = ("star", "amoeba", "heart", "snake")
PRETEXT_TEXTURES: tuple[str, ...] = ("sectors", "spiral", "blobs", "ramp")
_STREAMS = {"train": 7, "heldout": 8}  # the pretext pool's stream codes (the benchmark uses 1 = train, 2 = val)


def _shape(rng: np.random.Generator, name: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean footprint of pretext shape ``name`` with half-extent ``r`` in object coordinates.

    None is built from the benchmark's primitives (disc, square, triangle, ring, cross, bar): the outlines
    are polar curves with lobes (star, amoeba), an implicit curve (heart) or a sine-bent band (snake).
    """
    ang = np.arctan2(v, u)
    if name == "star":  # five points: radius oscillates with the angle
        k = rng.uniform(0.35, 0.55)
        rad = r * (1 - k * (0.5 + 0.5 * np.cos(5 * ang)))
        return u * u + v * v <= rad * rad
    if name == "amoeba":  # irregular smooth outline: random low-order Fourier radius
        amp, phase = rng.uniform(0.08, 0.2, 3), rng.uniform(0, 2 * math.pi, 3)
        rad = r * (0.8 + sum(a * np.cos(k * ang + p) for k, a, p in zip((2, 3, 4), amp, phase, strict=True)))
        return u * u + v * v <= rad * rad
    if name == "heart":  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled to r
        x, y = u / (0.85 * r), -v / (0.85 * r)
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if name == "snake":  # a band bent along a sine wave
        w, period = r * rng.uniform(0.22, 0.32), r * rng.uniform(0.8, 1.2)
        return (np.abs(u) <= r) & (np.abs(v - 0.45 * r * np.sin(2 * math.pi * u / period)) <= w)
    raise AssertionError(name)


def _texture(rng: np.random.Generator, name: str, u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """Pattern in ``[0, 1]`` of pretext texture ``name`` (object coordinates ``u, v``)."""
    if name == "sectors":  # pinwheel: angular sectors around the object's centre
        n = int(rng.integers(3, 7))
        return ((np.arctan2(v, u) + math.pi) / (2 * math.pi) * 2 * n % 2 < 1).astype(np.float32)
    if name == "spiral":  # an Archimedean spiral band: open arms, never a closed ring
        period = rng.uniform(6.0, 9.0)
        turns = np.sqrt(u * u + v * v) / period + (np.arctan2(v, u) + math.pi) / (2 * math.pi)
        return (turns % 1.0 < 0.5).astype(np.float32)
    if name == "blobs":  # thresholded smooth noise (camouflage patches)
        g = int(rng.integers(4, 8))
        low = rng.uniform(0, 255, (g, g)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)
        return (smooth > np.median(smooth)).astype(np.float32)
    if name == "ramp":  # a smooth linear ramp across the object
        phi = rng.uniform(0, 2 * math.pi)
        a = math.cos(phi) * u + math.sin(phi) * v
        return np.clip(0.5 + a / (2 * max(float(np.abs(a).max()), 1e-6)), 0, 1).astype(np.float32)
    raise AssertionError(name)


def render_pretext_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pretext image ``(S, S, 3)`` uint8 and its shape and texture maps ``(S, S)`` uint8 (0 = background).

    >>> img, shape, tex = render_pretext_image(np.random.default_rng(0), 32)
    >>> img.shape, int(shape.max()) <= 4, int(tex.max()) <= 4
    ((32, 32, 3), True, True)
    """
    s = int(size)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    g = int(rng.integers(2, 6))
    low = rng.uniform(0, 255, (g, g, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((s, s), Image.BICUBIC), dtype=np.float32)
    img = rng.uniform(40, 215, 3).astype(np.float32) + rng.uniform(0.2, 0.5) * (smooth - 127.5)
    shape_map = np.zeros((s, s), dtype=np.uint8)
    tex_map = np.zeros((s, s), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        sh, tx = int(rng.integers(len(PRETEXT_SHAPES))), int(rng.integers(len(PRETEXT_TEXTURES)))
        r = s * rng.uniform(0.16, 0.33)
        cy, cx = rng.uniform(0.15 * s, 0.85 * s, 2)
        theta = rng.uniform(0, 2 * math.pi)
        c, si = math.cos(theta), math.sin(theta)
        u = c * (xx - cx) + si * (yy - cy)
        v = -si * (xx - cx) + c * (yy - cy)
        foot = _shape(rng, PRETEXT_SHAPES[sh], u, v, r)
        t = _texture(rng, PRETEXT_TEXTURES[tx], u, v, s)
        c1 = rng.uniform(0, 255, 3).astype(np.float32)
        c2 = np.where(c1 > 127, c1 - rng.uniform(70, 127, 3), c1 + rng.uniform(70, 127, 3)).astype(np.float32)
        img[foot] = (c1 + (c2 - c1) * t[..., None])[foot]
        shape_map[foot] = sh + 1
        tex_map[foot] = tx + 1
    img += rng.normal(0.0, rng.uniform(2.0, 6.0), img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), shape_map, tex_map


def pretext_pool(seed: int, size: int, count: int, subset: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` pretext images ``(N, S, S, 3)`` uint8 and their shape and texture maps ``(N, S, S)`` uint8.

    ``subset="heldout"`` draws from a stream of its own, for the pretext accuracy of a pretrained encoder.
    """
    stream = _STREAMS[subset]
    items = [render_pretext_image(np.random.default_rng([int(seed), stream, i]), size) for i in range(int(count))]
    images, shapes, textures = (np.stack(x) for x in zip(*items, strict=True))
    return images, shapes, textures
