"""A dataset's layout on disk: where images and masks live, how a split-file line names them, and the
training pool that ``tools.make_split`` draws from.

Split folders (``dataset.split_dir``) follow the published U2PL / PC2Seg formats::

    <split_dir>/val.txt
    <split_dir>/<split>/labeled.txt
    <split_dir>/<split>/unlabeled.txt      (COCO: optional; default = every train image not in labeled.txt)

with one line per image in the dataset's own format (:meth:`Layout.sample` parses it, :meth:`Layout.line`
writes it). Subclasses: ``pascal.PascalLayout``, ``cityscapes.CityscapesLayout``, ``coco.CocoLayout`` and
:class:`FolderSplitLayout` (the folder layout read through split lists).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brpg_lightning.data.datasets.common import Sample, files_in
from brpg_lightning.errors import BRPGInputError


class Layout:
    """Base class. ``required`` folders (relative to ``root``) are checked by :meth:`check_root`.

    Attributes:
        name: the dataset preset name.
        tree: the expected tree, one line, printed by every layout error.
        class_names: default class names (``None``: the user's).
        complement_unlabeled: a missing ``unlabeled.txt`` means "every training image not labeled".
        lut: optional 256-entry raw-id -> class-id map for masks.
    """

    name = "layout"
    tree = ""
    required: tuple[str, ...] = ()
    class_names: tuple[str, ...] | None = None
    complement_unlabeled = False
    lut: np.ndarray | None = None

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def check_root(self) -> None:
        """One-line error naming the root (or the first missing folder) and printing the expected tree."""
        if not self.root.is_dir():
            raise BRPGInputError(f"dataset root '{self.root}' does not exist; expected the {self.name} layout {self.tree}")
        for rel in self.required:
            if not (self.root / rel).is_dir():
                raise BRPGInputError(
                    f"dataset root '{self.root}' has no folder '{rel}'; expected the {self.name} layout {self.tree}"
                )

    # -- split files
    def sample(self, line: str) -> Sample:
        """The :class:`Sample` a split-file line names (files are not checked here)."""
        raise NotImplementedError

    def line(self, sample: Sample) -> str:
        """The split-file line of ``sample`` (inverse of :meth:`sample`)."""
        raise NotImplementedError

    # -- pools (make_split; COCO's unlabeled complement)
    def train_pool(self) -> list[Sample]:
        """Training images that have a mask (labeled candidates), sorted."""
        raise NotImplementedError

    def train_images(self) -> list[Sample]:
        """Every training image (labeled candidates and mask-less ones), sorted."""
        return self.train_pool()

    def val_samples(self) -> list[Sample]:
        """The validation set as the dataset ships it (make_split writes it as ``val.txt``)."""
        raise NotImplementedError

    def rel(self, path: Path | str) -> str:
        return Path(path).relative_to(self.root).as_posix()


class FolderSplitLayout(Layout):
    """The folder layout read through split lists: lines are image paths relative to the root
    (``labeled/images/x.png``); the mask of ``<subset>/images/<stem>.*`` is ``<subset>/masks/<stem>.png``
    (none for ``unlabeled/``). The pool of make_split is ``labeled/images`` (those have masks) and every
    ``unlabeled/images`` file stays unlabeled.
    """

    name = "folder"
    tree = ("<root>/labeled/images, <root>/labeled/masks, <root>/unlabeled/images, <root>/val/images, "
            "<root>/val/masks")
    required = ("labeled/images", "val/images")

    def sample(self, line: str) -> Sample:
        image = self.root / line
        parts = Path(line).parts
        mask = None
        if len(parts) >= 3 and parts[-2] == "images" and parts[0] != "unlabeled":
            mask = image.parent.parent / "masks" / f"{image.stem}.png"
        return Sample(image, mask, image.stem)

    def line(self, sample: Sample) -> str:
        return self.rel(sample.image)

    def train_pool(self) -> list[Sample]:
        return [self.sample(self.rel(p)) for p in files_in(self.root / "labeled" / "images")]

    def train_images(self) -> list[Sample]:
        return self.train_pool() + [self.sample(self.rel(p)) for p in files_in(self.root / "unlabeled" / "images")]

    def val_samples(self) -> list[Sample]:
        return [self.sample(self.rel(p)) for p in files_in(self.root / "val" / "images")]
