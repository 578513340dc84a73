"""Datasets, splits, transforms and the datamodule."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations: no network version check on import
