"""Split names and split folders.

* :func:`validate_split`: a split name checked as a string (Hydra may pass ``16`` as an int).
* :func:`load_split`: the labeled / unlabeled / val lists of ``<split_dir>/<split>/{labeled,unlabeled}.txt``
  and ``<split_dir>/val.txt`` in a layout's line format, checked before training: the files exist and are
  not empty, every listed image (and every labeled/val mask) exists — the error gives the count and the
  first few missing — no list names an image twice, labeled and unlabeled do not overlap, and no
  validation image is in either (val leakage). Only names are checked here (a few
  ``stat`` calls per image, well under a second for COCO's 118k images); pixels are checked lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from brpg_lightning.data.datasets.cityscapes import CityscapesLayout
from brpg_lightning.data.datasets.coco import CocoLayout
from brpg_lightning.data.datasets.common import Sample, shown
from brpg_lightning.data.datasets.layout import FolderSplitLayout, Layout
from brpg_lightning.data.datasets.pascal import PascalLayout
from brpg_lightning.errors import BRPGInputError

LAYOUTS: dict[str, type[Layout]] = {
    "pascal": PascalLayout, "cityscapes": CityscapesLayout, "coco": CocoLayout, "folder": FolderSplitLayout,
}
SPLIT_TREE = "<split_dir>/val.txt and <split_dir>/<split>/labeled.txt, <split_dir>/<split>/unlabeled.txt"


def validate_split(split: str | int, valid_splits: Sequence[str | int] | None, dataset: str) -> str:
    """Return ``str(split)``; raise a one-line error when it is not in ``valid_splits`` (None: any split).

    >>> validate_split(16, ["16", 32, "full"], "synthetic")
    '16'
    >>> validate_split("17", [16, 32, "full"], "synthetic")
    Traceback (most recent call last):
    ...
    brpg_lightning.errors.BRPGInputError: split '17' is not valid for dataset 'synthetic'; valid splits: 16, 32, full
    """
    name = str(split)
    if valid_splits is None:
        return name
    valid = [str(s) for s in valid_splits]
    if name not in valid:
        raise BRPGInputError(f"split '{name}' is not valid for dataset '{dataset}'; valid splits: {', '.join(valid)}")
    return name


def make_layout(layout: str, root: str | Path, mask_dir: str | None = None, label_format: str | None = None) -> Layout:
    """The :class:`Layout` named ``layout`` (pascal | cityscapes | coco | folder) at ``root``."""
    if layout not in LAYOUTS:
        raise BRPGInputError(f"dataset.layout={layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "pascal":
        return PascalLayout(root, mask_dir or "SegmentationClassAug")
    if layout == "cityscapes":
        return CityscapesLayout(root, label_format or "trainIds")
    return LAYOUTS[layout](root)


@dataclass
class SplitLists:
    """Checked lists of one split."""

    labeled: list[Sample]
    unlabeled: list[Sample]
    val: list[Sample]
    files: dict[str, Path] = field(default_factory=dict)


def read_list(path: Path, what: str, allow_empty: bool = False) -> list[str]:
    """Non-empty stripped lines of a split file; one-line errors when it is missing or empty."""
    if not path.is_file():
        raise BRPGInputError(f"split file '{path}' does not exist; expected {what} in the layout {SPLIT_TREE}")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines and not allow_empty:
        raise BRPGInputError(f"split file '{path}' is empty; expected one line per image ({what})")
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if line in seen:  # a repeated image weighs twice in every epoch (or in the val mIoU)
            raise BRPGInputError(f"split file '{path}' lists '{line}' twice (lines {seen[line]} and {number} of the "
                                 f"non-blank lines); expected each image once")
        seen[line] = number
    return lines


class _Listing:
    """File names per folder, each folder listed once (``os.scandir``): existence checks of 100k files cost
    one directory read per folder instead of one ``stat`` per file."""

    def __init__(self) -> None:
        self.folders: dict[str, set[str]] = {}

    def exists(self, path: Path | str | None) -> bool:
        if path is None:
            return False
        parent, name = os.path.split(str(path))
        names = self.folders.get(parent)
        if names is None:
            try:
                with os.scandir(parent) as entries:
                    names = {e.name for e in entries if not e.is_dir()}
            except OSError:
                names = set()
            self.folders[parent] = names
        return name in names


def check_files(samples: Sequence[Sample], list_file: Path, masks: bool) -> None:
    """Every image (and mask when ``masks``) named by ``list_file`` exists; else count + first few."""
    listing = _Listing()
    missing = [str(s.image) for s in samples if not listing.exists(s.image)]
    if masks:
        missing += [str(s.mask) for s in samples if not listing.exists(s.mask)]
    if missing:
        raise BRPGInputError(
            f"split file '{list_file}' names {len(missing)} files that do not exist: {shown(missing, 3)}; "
            f"expected every listed file under dataset.root"
        )


def resolve_split_name(split_dir: Path, split: str) -> str:
    """The split folder name: ``split`` itself, or the one folder whose name without ``_`` is ``split``.

    Hydra reads ``split=1_128`` (COCO's names) as the integer literal ``1128``; this maps it back.
    """
    if (split_dir / split).is_dir() or not split.isdigit():
        return split
    matches = [p.name for p in split_dir.iterdir() if p.is_dir() and p.name.replace("_", "") == split]
    return matches[0] if len(matches) == 1 else split


def load_split(layout: Layout, split_dir: str | Path, split: str, need_unlabeled: bool = True) -> SplitLists:
    """Read and check the lists of ``split`` (see the module docstring).

    ``need_unlabeled``: an empty or missing unlabeled list is an error (a semi-supervised method);
    otherwise it is read only to count it (the supervised baseline keeps the same epoch length).
    """
    layout.check_root()
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise BRPGInputError(
            f"dataset.split_dir '{split_dir}' does not exist; expected a split folder {SPLIT_TREE} "
            f"(the published lists, or tools.make_split's output)"
        )
    split = resolve_split_name(split_dir, split)
    if not (split_dir / split).is_dir():
        names = sorted(p.name for p in split_dir.iterdir() if (p / "labeled.txt").is_file())
        raise BRPGInputError(
            f"split folder '{split_dir / split}' does not exist; splits in '{split_dir}': {', '.join(names) or 'none'}"
        )
    files = {k: split_dir / split / f"{k}.txt" for k in ("labeled", "unlabeled")}
    files["val"] = split_dir / "val.txt"
    labeled = [layout.sample(ln) for ln in read_list(files["labeled"], "labeled images")]
    val = [layout.sample(ln) for ln in read_list(files["val"], "validation images")]
    check_files(labeled, files["labeled"], masks=True)
    check_files(val, files["val"], masks=True)

    if files["unlabeled"].is_file() or not layout.complement_unlabeled:
        lines = read_list(files["unlabeled"], "unlabeled images", allow_empty=not need_unlabeled)
        unlabeled = [layout.sample(ln) for ln in lines]
        check_files(unlabeled, files["unlabeled"], masks=False)
    else:  # COCO: every training image not in labeled.txt
        named = {str(s.image) for s in labeled}
        unlabeled = [s for s in layout.train_images() if str(s.image) not in named]
        if need_unlabeled and not unlabeled:
            raise BRPGInputError(
                f"no unlabeled images: every training image of '{layout.root}' is in '{files['labeled']}'"
            )
    overlap = sorted({str(s.image) for s in labeled} & {str(s.image) for s in unlabeled})
    if overlap:
        raise BRPGInputError(
            f"{len(overlap)} images are both in '{files['labeled']}' and unlabeled: {shown(overlap, 3)}; "
            f"expected disjoint lists"
        )
    val_images = {str(s.image) for s in val}
    for name, samples in (("labeled", labeled), ("unlabeled", unlabeled)):
        leaked = sorted(val_images & {str(s.image) for s in samples})
        if leaked:  # the val mIoU would score images the model trained on
            raise BRPGInputError(
                f"{len(leaked)} images are both in '{files['val']}' and {name} ('{files[name]}'): {shown(leaked, 3)}; "
                f"expected validation images that are not trained on"
            )
    return SplitLists(labeled, unlabeled, val, files)
