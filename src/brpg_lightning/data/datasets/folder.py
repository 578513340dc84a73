"""Reader of the folder layout (a user's own dataset, and the generated synthetic one).

::

    <root>/labeled/images/<name>.<ext>     <root>/labeled/masks/<name>.png   (class ids, 255 = ignore)
    <root>/unlabeled/images/<name>.<ext>   (no masks)
    <root>/val/images/<name>.<ext>         <root>/val/masks/<name>.png

Images are the non-hidden files with one of ``common.IMAGE_SUFFIXES`` (png, jpg, jpeg, bmp, tif, tiff, webp;
any case) directly in each ``images`` folder (``common.files_in``).

Matching rule: an image and its mask share the file stem (``cat_01.jpg`` <-> ``cat_01.png``); masks are
always PNG. Every labeled/val image needs its mask and every mask its image: the error lists the unmatched
files (count and the first few). Masks are single-channel PNGs of class ids (mode L or P: palette PNGs are
read as their indices), or RGB PNGs when a classes file gives a palette (see :func:`read_classes_file`).

The layout is checked in the constructor (root, sub-folders, names); pixels are checked when an item loads
(and in the datamodule's sampled pre-pass). Every problem is a one-line
:class:`~brpg_lightning.errors.BRPGInputError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brpg_lightning.data.datasets.common import (
    IMAGE_SUFFIXES,
    PairDataset,
    Sample,
    Transform,
    check_mask_values,
    files_in,
    shown,
)
from brpg_lightning.errors import BRPGInputError

__all__ = ["EXPECTED_LAYOUT", "FolderDataset", "SUBSETS", "check_mask_values", "read_classes_file"]

SUBSETS: tuple[str, ...] = ("labeled", "unlabeled", "val")
EXPECTED_LAYOUT = (
    "<root>/labeled/images, <root>/labeled/masks, <root>/unlabeled/images, <root>/val/images, <root>/val/masks"
)


def read_classes_file(path: str | Path) -> tuple[list[str], np.ndarray | None]:
    """Class names and optional palette from a text file: one class per line, in id order.

    Each line is ``name`` or ``name R G B`` (0-255); either every line has a colour or none does; ``#``
    starts a comment. With colours, RGB masks are decoded through the palette (an unknown colour is an error).

    Returns ``(names, palette (C, 3) uint8 or None)``.
    """
    path = Path(path)
    if not path.is_file():
        raise BRPGInputError(f"dataset.classes_file '{path}' does not exist; expected one 'name [R G B]' per line")
    names: list[str] = []
    colours: list[list[int]] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (1, 4) or (len(parts) == 4 and not all(p.isdigit() and int(p) < 256 for p in parts[1:])):
            raise BRPGInputError(f"'{path}' line {number} is '{raw.strip()}'; expected 'name' or 'name R G B' (0-255)")
        names.append(parts[0])
        if len(parts) == 4:
            colours.append([int(p) for p in parts[1:]])
    if not names:
        raise BRPGInputError(f"dataset.classes_file '{path}' names no classes; expected one 'name [R G B]' per line")
    if colours and len(colours) != len(names):
        raise BRPGInputError(f"'{path}' gives colours for {len(colours)} of {len(names)} classes; expected all or none")
    return names, (np.array(colours, np.uint8) if colours else None)


class FolderDataset(PairDataset):
    """One subset of the folder layout.

    Items without ``transform``: ``{"image": (H, W, 3) uint8, "mask": (H, W) uint8, "name": str}`` (no
    ``"mask"`` for ``unlabeled``). With ``transform``: ``transform(image, mask_or_None)`` plus ``"name"``.

    Args:
        root: dataset root.
        subset: ``"labeled"``, ``"unlabeled"`` or ``"val"``.
        num_classes: ``C``; mask values must be in ``[0, C)`` or 255.
        transform: see :data:`~brpg_lightning.data.datasets.common.Transform`.
        allow_empty: accept an existing but empty ``images/`` folder (the unlabeled set of split "full").
        palette: ``(C, 3)`` colours: RGB masks are mapped to class ids through it.
        hidden_mask_dir: ``unlabeled`` only, diagnostics only: a folder of true masks ``<name>.png`` for the
            unlabeled images (the synthetic generator's hidden ``.oracle/unlabeled_masks``); they are then
            loaded as the item's mask. None (every normal run): the unlabeled set has no masks.
    """

    def __init__(
        self,
        root: str | Path,
        subset: str,
        num_classes: int,
        transform: Transform | None = None,
        allow_empty: bool = False,
        palette: np.ndarray | None = None,
        hidden_mask_dir: str | Path | None = None,
    ) -> None:
        if subset not in SUBSETS:
            raise BRPGInputError(f"subset '{subset}' is not valid; expected one of {', '.join(SUBSETS)}")
        self.root = Path(root)
        self.subset = subset
        if hidden_mask_dir is not None and subset != "unlabeled":
            raise BRPGInputError(f"hidden_mask_dir is for the unlabeled subset only, got subset '{subset}'")
        if not self.root.is_dir():
            raise BRPGInputError(f"dataset root '{self.root}' does not exist; expected the layout {EXPECTED_LAYOUT}")
        image_dir = self.root / subset / "images"
        images = self._list_required(image_dir, allow_empty)
        stems = [p.stem for p in images]
        if len(set(stems)) != len(stems):
            dup = sorted({s for s in stems if stems.count(s) > 1})[0]
            raise BRPGInputError(f"folder '{image_dir}' holds several images named '{dup}' (different extensions)")
        with_masks = subset != "unlabeled" or hidden_mask_dir is not None
        masks: list[Path | None] = [None] * len(images)
        if with_masks:
            masks = list(self._match_masks(image_dir, images, None if hidden_mask_dir is None else Path(hidden_mask_dir)))
        samples = [Sample(i, m, i.stem) for i, m in zip(images, masks, strict=True)]
        super().__init__(samples, num_classes, transform, with_masks=with_masks, palette=palette)
        self.images = images
        self.masks = [m for m in masks if m is not None]

    @staticmethod
    def _match_masks(image_dir: Path, images: list[Path], mask_dir: Path | None = None) -> list[Path]:
        mask_dir = image_dir.parent / "masks" if mask_dir is None else mask_dir
        if not mask_dir.is_dir():
            raise BRPGInputError(
                f"missing folder '{mask_dir}' (masks of '{image_dir}'); expected the layout {EXPECTED_LAYOUT}"
            )
        mask_files = {p.stem: p for p in files_in(mask_dir, (".png",))}
        if images and not mask_files:
            raise BRPGInputError(f"folder '{mask_dir}' holds no .png masks; expected one <name>.png per image")
        unmatched = [p for p in images if p.stem not in mask_files]
        if len(unmatched) == 1:
            image = unmatched[0]
            raise BRPGInputError(f"image '{image}' has no mask; expected '{mask_dir / (image.stem + '.png')}'")
        if unmatched:
            raise BRPGInputError(
                f"{len(unmatched)} images in '{image_dir}' have no mask of the same name in '{mask_dir}': "
                f"{shown([p.name for p in unmatched])}; expected <name>.png for each <name>.<ext>"
            )
        stems = {p.stem for p in images}
        orphans = sorted(name for stem, p in mask_files.items() if stem not in stems for name in [p.name])
        if orphans:
            raise BRPGInputError(
                f"{len(orphans)} masks in '{mask_dir}' have no image of the same name in '{image_dir}': "
                f"{shown(orphans)}; expected every mask to match an image by name"
            )
        return [mask_files[p.stem] for p in images]

    def _list_required(self, image_dir: Path, allow_empty: bool) -> list[Path]:
        if not image_dir.is_dir():
            raise BRPGInputError(f"missing folder '{image_dir}'; expected the layout {EXPECTED_LAYOUT}")
        images = files_in(image_dir)
        if not images and not allow_empty:
            raise BRPGInputError(
                f"folder '{image_dir}' holds no images ({', '.join(IMAGE_SUFFIXES)}); expected at least one"
            )
        return images
