"""Tiny dataset trees in the real layouts (PASCAL, Cityscapes, COCO), written by the tests.

Names come from the published split lists in ``/work/shared/splits`` (``$BRPG_SPLITS_DIR``) when that folder
exists, so the readers are exercised on real ids and paths; otherwise from look-alike generated names.
Nothing from those lists is copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_SPLITS = Path(os.environ.get("BRPG_SPLITS_DIR", "/work/shared/splits"))
SIZE = (12, 16)  # (H, W) of every tiny image

OFFICIAL_LABELS: tuple[tuple[str, int, int], ...] = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, -1),
)
"""(name, id, trainId) of cityscapesscripts ``helpers/labels.py``, transcribed independently of the reader."""


def voc_palette() -> list[int]:
    """The VOC colour palette (index -> RGB) as the devkit defines it: bit-interleaved 3-bit label codes."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def real_lines(dataset: str, rel: str, n: int) -> list[str] | None:
    """The first ``n`` lines of a published split list, or None when the shared folder is absent."""
    path = SHARED_SPLITS / dataset / rel
    if not path.is_file():
        return None
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return lines[:n]


def _image(rng: np.random.Generator, size: tuple[int, int] = SIZE) -> np.ndarray:
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if palette is not None:  # a palette PNG whose pixel values are the class indices
        im = Image.frombytes("P", array.shape[::-1], np.ascontiguousarray(array).tobytes())
        im.putpalette(palette)
    if path.suffix == ".jpg":
        im.save(path, quality=95)
    else:
        im.save(path)


def write_lists(split_dir: Path, split: str, labeled: list[str], unlabeled: list[str] | None, val: list[str]) -> Path:
    """``<split_dir>/<split>/labeled.txt`` (+ ``unlabeled.txt`` unless None) and ``<split_dir>/val.txt``."""
    (split_dir / split).mkdir(parents=True, exist_ok=True)
    (split_dir / split / "labeled.txt").write_text("".join(f"{x}\n" for x in labeled))
    if unlabeled is not None:
        (split_dir / split / "unlabeled.txt").write_text("".join(f"{x}\n" for x in unlabeled))
    (split_dir / "val.txt").write_text("".join(f"{x}\n" for x in val))
    return split_dir


def pascal_ids() -> tuple[list[str], list[str], list[str]]:
    """``(labeled, unlabeled, val)`` ids: 3, 4 and 2 names."""
    lab, unl, val = real_lines("pascal", "92/labeled.txt", 3), real_lines("pascal", "92/unlabeled.txt", 4), \
        real_lines("pascal", "val.txt", 2)
    if lab is None or unl is None or val is None:
        return ["2007_000032", "2007_000039", "2008_000123"], [f"2009_00{i}100" for i in range(4)], \
            ["2007_000033", "2007_000042"]
    return lab, unl, val


def pascal_tree(root: Path, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """JPEGImages, SegmentationClassAug (grey PNG), SegmentationClass (VOC palette PNG, labeled + val only),
    ImageSets/Segmentation/val.txt; split folder ``<root>/splits/92``. Returns the root and the masks by id."""
    rng = np.random.default_rng(seed)
    lab, unl, val = pascal_ids()
    masks = {}
    for i in lab + unl + val:
        save(root / "JPEGImages" / f"{i}.jpg", _image(rng))
        mask = rng.integers(0, 21, SIZE).astype(np.uint8)
        mask[0, :3] = 255  # object boundary
        masks[i] = mask
        save(root / "SegmentationClassAug" / f"{i}.png", mask)
        if i not in unl:
            save(root / "SegmentationClass" / f"{i}.png", mask, palette=voc_palette())
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in val))
    write_lists(root / "splits", "92", lab, unl, val)
    return root, masks


def cityscapes_paths() -> tuple[list[str], list[str], list[str]]:
    lab, unl, val = real_lines("cityscapes", "372/labeled.txt", 2), real_lines("cityscapes", "372/unlabeled.txt", 4), \
        real_lines("cityscapes", "val.txt", 2)
    if lab is None or unl is None or val is None:
        def name(split: str, city: str, k: int) -> str:
            return f"leftImg8bit/{split}/{city}/{city}_000000_{k:06d}_leftImg8bit.png"
        return [name("train", "aachen", k) for k in range(2)], [name("train", "bremen", k) for k in range(4)], \
            [name("val", "lindau", k) for k in range(2)]
    return lab, unl, val


def cityscapes_tree(root: Path, seed: int = 0, size: tuple[int, int] = SIZE) -> tuple[Path, dict[str, np.ndarray]]:
    """leftImg8bit + gtFine with both ``_labelIds`` (raw ids 0..33 and a few others) and ``_labelTrainIds``
    masks (mapped by the test's own table); split folder ``<root>/splits/372``. Returns raw labelIds masks."""
    to_train = np.full(256, 255, np.uint8)
    for _, label_id, train_id in OFFICIAL_LABELS:
        if train_id not in (255, -1) and label_id >= 0:
            to_train[label_id] = train_id
    rng = np.random.default_rng(seed)
    lab, unl, val = cityscapes_paths()
    raw = {}
    for line in lab + unl + val:
        save(root / line, _image(rng, size))
        parts = Path(line).parts
        stem = parts[3].removesuffix("_leftImg8bit.png")
        ids = rng.integers(0, 34, size).astype(np.uint8)
        raw[line] = ids
        gt = root / "gtFine" / parts[1] / parts[2]
        save(gt / f"{stem}_gtFine_labelIds.png", ids)
        save(gt / f"{stem}_gtFine_labelTrainIds.png", to_train[ids])
    (root / "leftImg8bit" / "val").mkdir(parents=True, exist_ok=True)
    (root / "gtFine" / "val").mkdir(parents=True, exist_ok=True)
    write_lists(root / "splits", "372", lab, unl, val)
    return root, raw


def coco_lines() -> tuple[list[str], list[str], list[str]]:
    """``(labeled lines, extra train image stems, val lines)``."""
    lab, val = real_lines("coco", "1_128/labeled.txt", 2), real_lines("coco", "val.txt", 2)
    if lab is None or val is None:
        lab = [f"train2017/{i:012d}.jpg masks/{i:012d}.png" for i in (9, 25)]
        val = [f"val2017/{i:012d}.jpg masks/{i:012d}.png" for i in (139, 285)]
    return lab, [f"{i:012d}" for i in (900001, 900002, 900003)], val


def coco_tree(root: Path, seed: int = 0) -> Path:
    """train2017 (labeled + 3 more images), val2017, masks; split folder ``<root>/splits/1_128`` without
    ``unlabeled.txt`` (the complement rule)."""
    rng = np.random.default_rng(seed)
    lab, extra, val = coco_lines()
    for line in lab + val:
        image, mask = line.split()
        save(root / image, _image(rng))
        save(root / mask, rng.integers(0, 81, SIZE).astype(np.uint8))
    for stem in extra:
        save(root / "train2017" / f"{stem}.jpg", _image(rng))
    write_lists(root / "splits", "1_128", lab, None, val)
    return root
