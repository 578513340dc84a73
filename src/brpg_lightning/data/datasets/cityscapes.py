"""Cityscapes (fine annotations)::

    <root>/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png   (dataset.label_format: trainIds)
    <root>/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png        (dataset.label_format: labelIds)

Split lines are image paths relative to the root (``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png``).
``labelIds`` masks are mapped to the 19 train ids by the official table (``cityscapesscripts``
``helpers/labels.py``: every id without a train id, and every id not in the table, becomes 255).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.data.datasets.common import Sample, files_in
from brpg_lightning.data.datasets.layout import Layout
from brpg_lightning.errors import BRPGInputError

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
"""The official table's ids with a train id (ids 0-33; the other 15 ids, e.g. 0 unlabeled, 9 parking,
29 caravan, 30 trailer, are ignored)."""
LABEL_FORMATS: dict[str, str] = {"trainIds": "_gtFine_labelTrainIds.png", "labelIds": "_gtFine_labelIds.png"}


def label_id_lut() -> np.ndarray:
    """256-entry uint8 table: ``lut[label_id] = train_id`` (255 elsewhere)."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


class CityscapesLayout(Layout):
    name = "cityscapes"
    class_names = CITYSCAPES_CLASSES
    required = ("leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val")

    def __init__(self, root: str | Path, label_format: str = "trainIds") -> None:
        super().__init__(root)
        if label_format not in LABEL_FORMATS:
            raise BRPGInputError(f"dataset.label_format={label_format!r}; expected one of {', '.join(LABEL_FORMATS)}")
        self.suffix = LABEL_FORMATS[label_format]
        self.lut = label_id_lut() if label_format == "labelIds" else None
        self.tree = (f"<root>/leftImg8bit/{{train,val}}/<city>/<name>_leftImg8bit.png and "
                     f"<root>/gtFine/{{train,val}}/<city>/<name>{self.suffix}")

    def sample(self, line: str) -> Sample:
        image = self.root / line
        parts = Path(line).parts
        if len(parts) != 4 or parts[0] != "leftImg8bit" or not parts[3].endswith("_leftImg8bit.png"):
            raise BRPGInputError(
                f"Cityscapes split line '{line}'; expected leftImg8bit/<train|val>/<city>/<name>_leftImg8bit.png"
            )
        name = parts[3].removesuffix("_leftImg8bit.png")
        return Sample(image, self.root / "gtFine" / parts[1] / parts[2] / f"{name}{self.suffix}", name)

    def line(self, sample: Sample) -> str:
        return self.rel(sample.image)

    def _images(self, subset: str) -> list[Sample]:
        base = self.root / "leftImg8bit" / subset
        cities = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        return [self.sample(self.rel(p)) for city in cities for p in files_in(city, (".png",))
                if p.name.endswith("_leftImg8bit.png")]

    def train_pool(self) -> list[Sample]:
        return self._images("train")

    def val_samples(self) -> list[Sample]:
        return self._images("val")
