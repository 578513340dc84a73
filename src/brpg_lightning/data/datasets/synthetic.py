"""The embedded synthetic segmentation dataset: procedural, seeded, written as PNGs in the folder layout.

Class 0 is background; each object class ``k >= 1`` is carried by a SHAPE family and a TEXTURE pattern,
never by a colour: every instance draws its own dark and light colour (free hue, so colour names no class,
but the pattern always has luminance contrast), scale, rotation, aspect, pattern period and phase. Each
texture is locally distinct (binary stripes, checker, dots, thin grid lines, pixel grain, or none at all)
and the periodic ones repeat every 6 px or more, so no resampling aliases them away. The background is
random-colour smooth noise blended with a gradient, and 30 % of the images also get a faint full-frame
texture of a random pattern (a distractor, so texture alone is not enough). Several objects (2-4) per image overlap (later ones occlude
earlier ones; a ring's hole shows what lies below), and Gaussian pixel noise is added last. Intra-class
variation is wide, so 16 labeled images do not cover it, while the classes stay learnable from scratch
at ``image_size=96`` (objects 23-48 px across).

With ``num_classes=7`` (default) the six object classes are
``disc/stripes, square/checker, triangle/dots, ring/grid, cross/grain, bar/solid``. More classes
combine the 6 shapes with the 6 textures pairwise (at most ``1 + 36`` classes); fewer use the first ones.

Determinism: image ``i`` of subset ``s`` uses ``numpy.random.default_rng([seed, code(s), i])``, and PNGs are
written by PIL without metadata, so the same arguments give byte-identical files. The train pool
(``pool_0000`` ...) and val (``val_0000`` ...) depend only on the seed and sizes; ``split`` only decides
how many of the first pool images go to ``labeled/`` (with masks) and which go to ``unlabeled/`` (images
only, no masks written).

Oracle diagnostic: the true masks of the unlabeled images are written to a SEPARATE hidden folder,
``<root>/.oracle/unlabeled_masks/`` (:data:`ORACLE_MASK_DIR`), which no reader of the folder layout looks at.
Only the diagnostic reads it (``dataset.oracle_mask_dir``, see ``benchmarks/diagnose_semi.py``): a normal run's
unlabeled set holds images only.

CLI: ``python -m brpg_lightning.data.datasets.synthetic --out DIR --seed 0 --split 16``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from brpg_lightning.errors import BRPGInputError

GENERATOR_VERSION = 4
"""Bumped whenever the generated pixels change; part of the ``.complete`` marker."""

SYNTHETIC_SPLITS: tuple[str, ...] = ("16", "32", "full")
"""Valid ``split`` values: that many labeled pool images, or all of them (the all-labels ceiling)."""

MARKER_NAME = ".complete"
ORACLE_MASK_DIR = ".oracle/unlabeled_masks"
"""Hidden folder (relative to the root) of the unlabeled images' true masks; read only by the diagnostic."""
_IN_PROGRESS_NAME = ".generating"
_SUBSET_CODES = {"train": 1, "val": 2}

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross", "bar")
TEXTURES: tuple[str, ...] = ("stripes", "checker", "dots", "grid", "grain", "solid")
MAX_NUM_CLASSES = 1 + len(SHAPES) * len(TEXTURES)


def class_shape_texture(cls: int) -> tuple[int, int]:
    """Shape-family and texture indices of object class ``cls >= 1``.

    Object ``j = cls - 1`` gets shape ``j % 6`` and texture ``(j + j // 6) % 6``: the first six classes
    pair shape ``j`` with texture ``j``; later ones reuse the shapes with other textures, so every
    (shape, texture) pair is distinct up to 36 object classes.

    >>> class_shape_texture(1), class_shape_texture(6), class_shape_texture(7)
    ((0, 0), (5, 5), (0, 1))
    """
    if cls < 1:
        raise ValueError(f"object classes start at 1, got {cls}")
    j = cls - 1
    return j % len(SHAPES), (j + j // len(SHAPES)) % len(TEXTURES)


def synthetic_class_names(num_classes: int) -> list[str]:
    """Class names: ``background`` then the shape name (``shape_texture`` beyond the first six objects).

    >>> synthetic_class_names(4)
    ['background', 'disc', 'square', 'triangle']
    >>> synthetic_class_names(8)[-1]
    'disc_checker'
    """
    _check_num_classes(num_classes)
    names = ["background"]
    for cls in range(1, num_classes):
        shape, texture = class_shape_texture(cls)
        names.append(SHAPES[shape] if cls <= len(SHAPES) else f"{SHAPES[shape]}_{TEXTURES[texture]}")
    return names


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= int(num_classes) <= MAX_NUM_CLASSES:
        raise BRPGInputError(
            f"synthetic num_classes={num_classes} is not supported; expected 2..{MAX_NUM_CLASSES} "
            f"(background + up to {MAX_NUM_CLASSES - 1} shape/texture object classes)"
        )


def num_labeled_for_split(split: str | int, train_pool: int) -> int:
    """Number of pool images that go to ``labeled/`` for ``split``.

    >>> num_labeled_for_split("16", 400), num_labeled_for_split(32, 400), num_labeled_for_split("full", 400)
    (16, 32, 400)
    """
    split = str(split)
    if split not in SYNTHETIC_SPLITS:
        raise BRPGInputError(
            f"split '{split}' is not valid for dataset 'synthetic'; valid splits: {', '.join(SYNTHETIC_SPLITS)}"
        )
    n = train_pool if split == "full" else int(split)
    if n > train_pool:
        raise BRPGInputError(f"synthetic split '{split}' needs train_pool >= {n}, got train_pool={train_pool}")
    return n


# --------------------------------------------------------------------------- drawing (pure numpy)
def _rotated(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates rotated by a random angle (a pattern's own orientation)."""
    phi = rng.uniform(0.0, math.pi)
    c, s = math.cos(phi), math.sin(phi)
    return c * u + s * v, -s * u + c * v


def _tex_stripes(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    a, _ = _rotated(rng, u, v)
    period = rng.uniform(6.0, 10.0)
    return (np.sin(2 * math.pi * a / period + rng.uniform(0, 2 * math.pi)) > 0).astype(np.float32)


def _tex_checker(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    a, b = _rotated(rng, u, v)
    cell = rng.uniform(4.0, 6.5)
    off = rng.uniform(0.0, 1.0, 2)
    return ((np.floor(a / cell + off[0]) + np.floor(b / cell + off[1])) % 2).astype(np.float32)


def _tex_dots(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    a, b = _rotated(rng, u, v)
    spacing = rng.uniform(7.0, 10.0)
    radius = spacing * rng.uniform(0.22, 0.3)
    off = rng.uniform(0.0, 1.0, 2)
    fa = (a / spacing + off[0]) % 1.0 - 0.5
    fb = (b / spacing + off[1]) % 1.0 - 0.5
    return ((fa * fa + fb * fb) * spacing * spacing <= radius * radius).astype(np.float32)


def _tex_grid(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    a, b = _rotated(rng, u, v)
    period = rng.uniform(6.0, 9.0)
    half_width = rng.uniform(0.7, 1.1)
    off = rng.uniform(0.0, 1.0, 2)
    da = np.abs((a / period + off[0]) % 1.0 - 0.5) * period
    db = np.abs((b / period + off[1]) % 1.0 - 0.5) * period
    return ((da <= half_width) | (db <= half_width)).astype(np.float32)


def _tex_grain(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    grain = int(rng.integers(1, 3))
    h, w = u.shape
    noise = (rng.random((h // grain + 1, w // grain + 1)) < 0.5).astype(np.float32)
    return np.repeat(np.repeat(noise, grain, axis=0), grain, axis=1)[:h, :w]


def _tex_solid(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """No pattern: one flat colour (the untextured class; its identity is its shape)."""
    return np.zeros(u.shape, dtype=np.float32)


_TEXTURE_FNS: tuple[Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray], ...] = (
    _tex_stripes, _tex_checker, _tex_dots, _tex_grid, _tex_grain, _tex_solid,
)


def _shape_mask(rng: np.random.Generator, shape: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean ``(H, W)`` footprint of shape family ``shape`` of half-extent ``r`` in object coordinates."""
    name = SHAPES[shape]
    if name == "disc":
        a = rng.uniform(0.9, 1.1)
        return (u / a) ** 2 + (v * a) ** 2 <= r * r
    if name == "square":
        h, a = 0.85 * r, rng.uniform(0.85, 1.15)
        return (np.abs(u) <= h * a) & (np.abs(v) <= h / a)
    if name == "triangle":
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):  # three outward normals 120 degrees apart; offsets = inradius (r / 2), jittered
            ang = math.pi / 2 + 2 * math.pi * k / 3
            inside &= u * math.cos(ang) + v * math.sin(ang) <= 0.55 * r * rng.uniform(0.85, 1.15)
        return inside
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (r * rng.uniform(0.45, 0.62)) ** 2)
    if name == "cross":
        w = r * rng.uniform(0.28, 0.4)
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if name == "bar":
        return (np.abs(u) <= 1.15 * r) & (np.abs(v) <= r * rng.uniform(0.38, 0.5))
    raise AssertionError(name)


def _random_colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark and a light RGB colour (channels in ``[0, 110]`` and ``[145, 255]``), in random order.

    Hue and saturation are free, so colour never names a class, but the pattern always has luminance
    contrast: the texture is visible in every instance.
    """
    dark = rng.uniform(0.0, 110.0, 3).astype(np.float32)
    light = rng.uniform(145.0, 255.0, 3).astype(np.float32)
    return (dark, light) if rng.random() < 0.5 else (light, dark)


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Float ``(S, S, 3)`` background: a random-colour gradient + smooth colour noise (+ faint texture).

    Its local contrast stays below the objects' (noise amplitude 20-50 vs dark/light object colour pairs at least 35 apart per channel),
    so objects are salient while their class still needs shape and texture.
    """
    ang = rng.uniform(0.0, 2 * math.pi)
    t = (math.cos(ang) * xx + math.sin(ang) * yy) / size
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c_a, c_b = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
    bg = c_a + (c_b - c_a) * t[..., None]
    g = int(rng.integers(3, 8))
    low = rng.uniform(0.0, 255.0, (g, g, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)
    bg = bg + rng.uniform(20.0, 50.0) / 127.5 * (smooth - 127.5)
    if rng.random() < 0.3:  # a faint distractor pattern: texture alone does not mean "object"
        tex = _TEXTURE_FNS[int(rng.integers(len(_TEXTURE_FNS)))](rng, xx - size / 2, yy - size / 2)
        bg = bg + rng.uniform(8.0, 20.0) * (tex[..., None] - 0.5) * rng.choice([-1.0, 1.0], 3)
    return bg


def render_synthetic_image(
    rng: np.random.Generator, image_size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask.

    Returns:
        image ``(S, S, 3)`` uint8 RGB and mask ``(S, S)`` uint8 with class ids in ``[0, num_classes)``.

    >>> img, mask = render_synthetic_image(np.random.default_rng(0), 32, 4)
    >>> img.shape, img.dtype, mask.shape, int(mask.max()) < 4
    ((32, 32, 3), dtype('uint8'), (32, 32), True)
    """
    _check_num_classes(num_classes)
    s = int(image_size)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    img = _background(rng, s, yy, xx)
    mask = np.zeros((s, s), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 5))):  # 2-4 objects; later ones occlude earlier ones
        cls = int(rng.integers(1, num_classes))
        shape, texture = class_shape_texture(cls)
        r = s * rng.uniform(0.12, 0.25)  # 23-48 px across at S = 96
        cy, cx = rng.uniform(0.1 * s, 0.9 * s, 2)
        theta = rng.uniform(0.0, 2 * math.pi)
        c, si = math.cos(theta), math.sin(theta)
        u = c * (xx - cx) + si * (yy - cy)
        v = -si * (xx - cx) + c * (yy - cy)
        footprint = _shape_mask(rng, shape, u, v, r)
        t = _TEXTURE_FNS[texture](rng, u, v)
        c1, c2 = _random_colour_pair(rng)
        img[footprint] = (c1 + (c2 - c1) * t[..., None])[footprint]
        mask[footprint] = cls
    img += rng.normal(0.0, rng.uniform(2.0, 8.0), img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


# --------------------------------------------------------------------------- writing
def _params(seed: int, split: str, num_classes: int, image_size: int, train_pool: int, val_size: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "split": str(split),
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        "train_pool": int(train_pool),
        "val_size": int(val_size),
    }


def _read_marker_params(root: Path) -> dict | None:
    """The generation parameters recorded in ``root``'s marker (it also holds class names), or None."""
    try:
        marker = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    return {key: marker.get(key) for key in _params(0, "16", 2, 8, 16, 1)}


def _save_png(array: np.ndarray, path: Path) -> None:
    """PNG without metadata (no timestamps): byte-identical for identical arrays."""
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _write_oracle_masks(root: Path, seed: int, image_size: int, num_classes: int, n_labeled: int,
                        train_pool: int) -> None:
    """The unlabeled images' true masks in the hidden ``.oracle/unlabeled_masks/`` (the ones missing)."""
    folder = root / ORACLE_MASK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_labeled, int(train_pool)):
        path = folder / f"pool_{i:04d}.png"
        if not path.exists():
            _, mask = render_synthetic_image(np.random.default_rng([int(seed), _SUBSET_CODES["train"], i]),
                                             image_size, num_classes)
            _save_png(mask, path)


def generate_synthetic(
    root: str | Path,
    *,
    seed: int = 0,
    split: str | int = "16",
    num_classes: int = 7,
    image_size: int = 96,
    train_pool: int = 400,
    val_size: int = 128,
    force: bool = False,
    oracle_masks: bool = False,
) -> Path:
    """Write the synthetic dataset into ``root`` in the folder layout and return ``root``.

    Layout: ``labeled/{images,masks}/pool_XXXX.png`` (the first N pool images), ``unlabeled/images/``
    (the rest, no masks), ``val/{images,masks}/val_XXXX.png``; with ``oracle_masks`` the unlabeled images' masks
    go to the hidden ``.oracle/unlabeled_masks/`` (diagnostics only; added to an existing set when asked
    later). A ``.complete`` JSON marker holds the
    parameters and :data:`GENERATOR_VERSION`; when it matches, nothing is rewritten. When it is absent or
    differs (or ``force``), ``labeled/``, ``unlabeled/`` and ``val/`` are deleted and regenerated. A root
    holding those folders without any marker of this generator is refused (it may be a user's dataset)
    unless ``force``.

    Args:
        root: output folder (created).
        seed: fixes the train pool and val images.
        split: "16" | "32" | "full" (ints accepted).
        num_classes: background + object classes, ``2..37``.
        image_size: square image side ``S``.
        train_pool: number of train images (labeled + unlabeled).
        val_size: number of val images.
        force: regenerate even when the marker matches.
        oracle_masks: also write the unlabeled images' true masks (the diagnostics lab reads them).
    """
    root = Path(root)
    split = str(split)
    _check_num_classes(num_classes)
    n_labeled = num_labeled_for_split(split, int(train_pool))
    if int(image_size) < 8 or int(val_size) < 1:
        raise BRPGInputError(f"synthetic image_size={image_size} (>= 8) and val_size={val_size} (>= 1) expected")
    params = _params(seed, split, num_classes, image_size, train_pool, val_size)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Runs started side by side (two seeds on one machine, DDP ranks, a multirun) share the cache: the first
    # generates while the others wait, then find the marker; without the lock one read half-written PNGs.
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _generate_locked(root, params, seed, split, num_classes, image_size, train_pool, val_size,
                                n_labeled, force, oracle_masks)


def _generate_locked(root: Path, params: dict, seed: int, split: str, num_classes: int, image_size: int,
                     train_pool: int, val_size: int, n_labeled: int, force: bool, oracle_masks: bool) -> Path:
    """:func:`generate_synthetic` under its cache lock."""
    if not force and _read_marker_params(root) == params:
        if oracle_masks:
            _write_oracle_masks(root, seed, image_size, num_classes, n_labeled, train_pool)
        return root

    subsets = [root / "labeled", root / "unlabeled", root / "val", root / ".oracle"]
    ours = (root / MARKER_NAME).exists() or (root / _IN_PROGRESS_NAME).exists()
    if not force and not ours and any(p.exists() and any(p.rglob("*")) for p in subsets):
        raise BRPGInputError(
            f"'{root}' already holds labeled/unlabeled/val folders not written by generate_synthetic; "
            f"choose another root or pass force=True to overwrite them"
        )
    (root / MARKER_NAME).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / _IN_PROGRESS_NAME).write_text(json.dumps(params))
    for p in subsets:
        if p.exists():
            shutil.rmtree(p)
    dirs = {
        "li": root / "labeled" / "images", "lm": root / "labeled" / "masks",
        "ui": root / "unlabeled" / "images", "vi": root / "val" / "images", "vm": root / "val" / "masks",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    for i in range(int(train_pool)):
        rng = np.random.default_rng([int(seed), _SUBSET_CODES["train"], i])
        image, mask = render_synthetic_image(rng, image_size, num_classes)
        name = f"pool_{i:04d}.png"
        if i < n_labeled:
            _save_png(image, dirs["li"] / name)
            _save_png(mask, dirs["lm"] / name)
        else:
            _save_png(image, dirs["ui"] / name)
    for i in range(int(val_size)):
        rng = np.random.default_rng([int(seed), _SUBSET_CODES["val"], i])
        image, mask = render_synthetic_image(rng, image_size, num_classes)
        name = f"val_{i:04d}.png"
        _save_png(image, dirs["vi"] / name)
        _save_png(mask, dirs["vm"] / name)

    if oracle_masks:
        _write_oracle_masks(root, seed, image_size, num_classes, n_labeled, train_pool)
    marker = dict(params, class_names=synthetic_class_names(num_classes), num_labeled=n_labeled)
    (root / MARKER_NAME).write_text(json.dumps(marker, indent=1, sort_keys=True))
    (root / _IN_PROGRESS_NAME).unlink(missing_ok=True)
    return root


def main(argv: list[str] | None = None) -> None:
    """``python -m brpg_lightning.data.datasets.synthetic --out DIR [--seed 0] [--split 16] ...``"""
    parser = argparse.ArgumentParser(description="Generate the synthetic segmentation dataset (folder layout).")
    parser.add_argument("--out", required=True, help="output root folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="16", choices=list(SYNTHETIC_SPLITS))
    parser.add_argument("--num-classes", type=int, default=7)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--train-pool", type=int, default=400)
    parser.add_argument("--val-size", type=int, default=128)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    root = generate_synthetic(
        args.out, seed=args.seed, split=args.split, num_classes=args.num_classes, image_size=args.image_size,
        train_pool=args.train_pool, val_size=args.val_size, force=args.force,
    )
    print(root)


if __name__ == "__main__":
    main()
