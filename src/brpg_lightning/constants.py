"""Project-wide constants, named once."""

IGNORE_INDEX: int = 255
"""Label value ignored by every loss and metric (padding, unlabeled pixels, void)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
