"""MS COCO 2017 as semantic segmentation (81 classes: background + the 80 object categories)::

    <root>/train2017/<id>.jpg
    <root>/val2017/<id>.jpg
    <root>/masks/<id>.png          index PNGs (0 = background, 1-80 in category order, 255 = ignore)

Split lines are ``<image path> <mask path>`` relative to the root (``train2017/000000177254.jpg
masks/000000177254.png``), as PC2Seg / U2PL publish them. A split folder without ``unlabeled.txt`` means:
every ``train2017`` image that ``labeled.txt`` does not name is unlabeled.
"""

from __future__ import annotations

from brpg_lightning.data.datasets.common import Sample, files_in, names_in
from brpg_lightning.data.datasets.layout import Layout
from brpg_lightning.errors import BRPGInputError

COCO_CLASSES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


class CocoLayout(Layout):
    name = "coco"
    class_names = COCO_CLASSES
    required = ("train2017", "val2017", "masks")
    complement_unlabeled = True
    tree = "<root>/train2017/<id>.jpg, <root>/val2017/<id>.jpg, <root>/masks/<id>.png"

    def sample(self, line: str) -> Sample:
        parts = line.split()
        if len(parts) not in (1, 2):
            raise BRPGInputError(f"COCO split line '{line}'; expected '<image path> <mask path>'")
        image = self.root / parts[0]
        mask = self.root / parts[1] if len(parts) == 2 else self.root / "masks" / f"{image.stem}.png"
        return Sample(image, mask, image.stem)

    def line(self, sample: Sample) -> str:
        assert sample.mask is not None
        return f"{self.rel(sample.image)} {self.rel(sample.mask)}"

    def train_images(self) -> list[Sample]:
        """Every ``train2017`` image, as string paths (118k ``pathlib`` objects would cost seconds at start)."""
        images, masks = str(self.root / "train2017"), str(self.root / "masks")
        stems = (n.rpartition(".") for n in names_in(self.root / "train2017", (".jpg", ".jpeg", ".png")))
        return [Sample(f"{images}/{stem}.{ext}", f"{masks}/{stem}.png", stem) for stem, _, ext in stems]

    def train_pool(self) -> list[Sample]:
        masks = {n.rpartition(".")[0] for n in names_in(self.root / "masks", (".png",))}
        return [s for s in self.train_images() if s.name in masks]

    def val_samples(self) -> list[Sample]:
        masks = {p.stem for p in files_in(self.root / "masks", (".png",))}
        return [self.sample(self.rel(p)) for p in files_in(self.root / "val2017", (".jpg", ".jpeg", ".png"))
                if p.stem in masks]
