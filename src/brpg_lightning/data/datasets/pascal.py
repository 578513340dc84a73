"""PASCAL VOC 2012 (classic and blended settings)::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClassAug/<id>.png      blended setting (SBD-augmented, 10,582 training masks)
    <root>/SegmentationClass/<id>.png         classic setting (the 1,464 fine masks + 1,449 val)
    <root>/ImageSets/Segmentation/val.txt     (optional; make_split's val set)

``dataset.mask_dir`` picks the mask folder. Split lines are image ids (``2007_000032``). Masks are palette
(mode P) or grey (mode L) PNGs read as class indices; 255 (object boundaries) is ignored.
"""

from __future__ import annotations

from pathlib import Path

from brpg_lightning.data.datasets.common import Sample, files_in
from brpg_lightning.data.datasets.layout import Layout
from brpg_lightning.errors import BRPGInputError

PASCAL_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
MASK_DIRS: tuple[str, ...] = ("SegmentationClassAug", "SegmentationClass")


class PascalLayout(Layout):
    name = "pascal"
    class_names = PASCAL_CLASSES

    def __init__(self, root: str | Path, mask_dir: str = "SegmentationClassAug") -> None:
        super().__init__(root)
        if mask_dir not in MASK_DIRS:
            raise BRPGInputError(f"dataset.mask_dir={mask_dir!r}; expected one of {', '.join(MASK_DIRS)}")
        self.mask_dir = mask_dir
        self.required = ("JPEGImages", mask_dir)
        self.tree = (f"<root>/JPEGImages/<id>.jpg and <root>/{mask_dir}/<id>.png "
                     f"(dataset.mask_dir: SegmentationClassAug = blended, SegmentationClass = classic)")

    def sample(self, line: str) -> Sample:
        return Sample(self.root / "JPEGImages" / f"{line}.jpg", self.root / self.mask_dir / f"{line}.png", line)

    def line(self, sample: Sample) -> str:
        return sample.name

    def _val_ids(self) -> set[str]:
        val = self.root / "ImageSets" / "Segmentation" / "val.txt"
        return set(val.read_text().split()) if val.is_file() else set()

    def train_pool(self) -> list[Sample]:
        val = self._val_ids()
        return [self.sample(p.stem) for p in files_in(self.root / self.mask_dir, (".png",)) if p.stem not in val]

    def train_images(self) -> list[Sample]:
        """Training images are those with a mask in ``SegmentationClassAug`` (the 10,582 train_aug ids),
        whatever ``mask_dir`` is: the classic setting labels fine masks and leaves the rest unlabeled."""
        val = self._val_ids()
        aug = self.root / "SegmentationClassAug"
        folder = aug if aug.is_dir() else self.root / self.mask_dir
        return [self.sample(p.stem) for p in files_in(folder, (".png",)) if p.stem not in val]

    def val_samples(self) -> list[Sample]:
        val = self.root / "ImageSets" / "Segmentation" / "val.txt"
        if not val.is_file():
            raise BRPGInputError(f"'{val}' does not exist; expected the PASCAL val id list (1,449 ids)")
        return [self.sample(i) for i in val.read_text().split()]
