"""Fixtures of the data tests: tiny folder-layout trees written into ``tmp_path``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_tree(
    root: Path,
    n_labeled: int = 3,
    n_unlabeled: int = 10,
    n_val: int = 2,
    size: tuple[int, int] = (16, 20),
    num_classes: int = 3,
    seed: int = 0,
) -> Path:
    """Write ``<root>/{labeled,unlabeled,val}`` with random RGB PNG images and class-id PNG masks.

    Names are ``l_XX``, ``u_XX``, ``v_XX``; ``size`` is ``(H, W)``. ``unlabeled/images`` is created even
    when empty; no unlabeled masks are written.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    for subset, prefix, n in (("labeled", "l", n_labeled), ("unlabeled", "u", n_unlabeled), ("val", "v", n_val)):
        (root / subset / "images").mkdir(parents=True, exist_ok=True)
        if subset != "unlabeled":
            (root / subset / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{prefix}_{i:02d}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / subset / "images" / name)
            if subset != "unlabeled":
                Image.fromarray(rng.integers(0, num_classes, (h, w), dtype=np.uint8)).save(
                    root / subset / "masks" / name
                )
    return root


@pytest.fixture
def folder_tree(tmp_path: Path) -> Callable[..., Path]:
    """``folder_tree(**kwargs)`` writes a tree under ``tmp_path/data`` (see :func:`write_tree`)."""

    def make(**kwargs) -> Path:
        return write_tree(tmp_path / "data", **kwargs)

    return make
