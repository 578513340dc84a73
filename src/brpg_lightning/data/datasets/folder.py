"""Reader of the folder layout (a user's own dataset, and the generated synthetic one).

::

    <root>/labeled/images/<name>.{png,jpg,jpeg}     <root>/labeled/masks/<name>.png   (class ids, 255 = ignore)
    <root>/unlabeled/images/<name>.{png,jpg,jpeg}   (no masks)
    <root>/val/images/<name>.{png,jpg,jpeg}         <root>/val/masks/<name>.png

The layout is checked in the constructor (root, sub-folders, one mask per labeled/val image); mask values
are checked when an item loads. Every problem is a one-line :class:`~brpg_lightning.errors.BRPGInputError`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError

SUBSETS: tuple[str, ...] = ("labeled", "unlabeled", "val")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
EXPECTED_LAYOUT = (
    "<root>/labeled/images, <root>/labeled/masks, <root>/unlabeled/images, <root>/val/images, <root>/val/masks"
)

Transform = Callable[[np.ndarray, "np.ndarray | None"], dict[str, Any]]
"""``transform(image (H, W, 3) uint8, mask (H, W) uint8 or None) -> item dict`` (see ``data.transforms``)."""


def list_images(folder: Path) -> list[Path]:
    """Image files (``.png/.jpg/.jpeg``, any case, not hidden) directly in ``folder``, sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def check_mask_values(mask: np.ndarray, num_classes: int, path: str | Path) -> None:
    """Raise when ``mask`` holds a value outside ``[0, num_classes)`` that is not ``IGNORE_INDEX`` (255).

    >>> check_mask_values(np.array([[0, 2], [255, 1]]), 3, "m.png")
    >>> check_mask_values(np.array([[0, 3], [7, 255]]), 3, "m.png")
    Traceback (most recent call last):
    ...
    brpg_lightning.errors.BRPGInputError: mask 'm.png' has values [3, 7] outside [0, 3) (255 = ignore is allowed)
    """
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:20]) + (", ..." if bad.size > 20 else "")
        raise BRPGInputError(
            f"mask '{path}' has values [{shown}] outside [0, {num_classes}) ({IGNORE_INDEX} = ignore is allowed)"
        )


def load_image(path: Path) -> np.ndarray:
    """RGB image as a ``(H, W, 3)`` uint8 array (grey, palette and RGBA images are converted)."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def load_mask(path: Path, num_classes: int) -> np.ndarray:
    """Single-channel class-id mask as ``(H, W)`` uint8 (PNG mode L, P, I or I;16; values checked)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise BRPGInputError(
                f"mask '{path}' has PIL mode {im.mode}; expected a single-channel PNG of class ids (mode L or P)"
            )
        mask = np.array(im)
    check_mask_values(mask, num_classes, path)
    return mask.astype(np.uint8)


class FolderDataset(Dataset):
    """One subset of the folder layout.

    Items without ``transform``: ``{"image": (H, W, 3) uint8, "mask": (H, W) uint8, "name": str}`` (no
    ``"mask"`` for ``unlabeled``). With ``transform``: ``transform(image, mask_or_None)`` plus ``"name"``.

    Args:
        root: dataset root.
        subset: ``"labeled"``, ``"unlabeled"`` or ``"val"``.
        num_classes: ``C``; mask values must be in ``[0, C)`` or 255.
        transform: see :data:`Transform`.
        allow_empty: accept an existing but empty ``images/`` folder (the unlabeled set of split "full").
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
        hidden_mask_dir: str | Path | None = None,
    ) -> None:
        if subset not in SUBSETS:
            raise BRPGInputError(f"subset '{subset}' is not valid; expected one of {', '.join(SUBSETS)}")
        self.root = Path(root)
        self.subset = subset
        self.num_classes = int(num_classes)
        self.transform = transform
        self.has_masks = subset != "unlabeled" or hidden_mask_dir is not None
        if hidden_mask_dir is not None and subset != "unlabeled":
            raise BRPGInputError(f"hidden_mask_dir is for the unlabeled subset only, got subset '{subset}'")
        if not self.root.is_dir():
            raise BRPGInputError(f"dataset root '{self.root}' does not exist; expected the layout {EXPECTED_LAYOUT}")

        image_dir = self.root / subset / "images"
        self.images = self._list_required(image_dir, allow_empty)
        self.masks: list[Path] = []
        if self.has_masks:
            mask_dir = self.root / subset / "masks" if hidden_mask_dir is None else Path(hidden_mask_dir)
            if not mask_dir.is_dir():
                raise BRPGInputError(
                    f"missing folder '{mask_dir}' (masks of '{image_dir}'); expected the layout {EXPECTED_LAYOUT}"
                )
            if self.images and not any(mask_dir.glob("*.png")):
                raise BRPGInputError(f"folder '{mask_dir}' holds no .png masks; expected one <name>.png per image")
            for image in self.images:
                mask = mask_dir / f"{image.stem}.png"
                if not mask.is_file():
                    raise BRPGInputError(f"image '{image}' has no mask; expected '{mask}'")
                self.masks.append(mask)
        stems = [p.stem for p in self.images]
        if len(set(stems)) != len(stems):
            dup = sorted({s for s in stems if stems.count(s) > 1})[0]
            raise BRPGInputError(f"folder '{image_dir}' holds several images named '{dup}' (different extensions)")
        self.names = stems

    def _list_required(self, image_dir: Path, allow_empty: bool) -> list[Path]:
        if not image_dir.is_dir():
            raise BRPGInputError(f"missing folder '{image_dir}'; expected the layout {EXPECTED_LAYOUT}")
        images = list_images(image_dir)
        if not images and not allow_empty:
            raise BRPGInputError(
                f"folder '{image_dir}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); expected at least one"
            )
        return images

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw ``(image (H, W, 3) uint8, mask (H, W) uint8 or None)`` of item ``index``."""
        image = load_image(self.images[index])
        if not self.has_masks:
            return image, None
        mask = load_mask(self.masks[index], self.num_classes)
        if mask.shape != image.shape[:2]:
            raise BRPGInputError(
                f"mask '{self.masks[index]}' is {mask.shape[1]}x{mask.shape[0]} but image "
                f"'{self.images[index]}' is {image.shape[1]}x{image.shape[0]}; expected the same size"
            )
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.load(index)
        if self.transform is not None:
            item = dict(self.transform(image, mask))
        else:
            item = {"image": image} if mask is None else {"image": image, "mask": mask}
        item["name"] = self.names[index]
        return item
