"""Data pipeline throughput: the albumentations + OpenCV path vs the previous PIL + torchvision path.

The full training input pipeline at the paper's PASCAL crop (513): decode a labeled JPEG + PNG mask ->
weak view (rescale 0.5-2.0, flip, pad, crop); decode an unlabeled JPEG -> weak view + strong view (colour
jitter, grey, blur) on the same crop; normalise to tensors; collate. Images are 500x375 JPEGs (PASCAL's
typical size) with smooth content, written once to a temporary folder.

Both paths run side by side in one process, interleaved (A, B, A, B, ...), through ``DataLoader`` with
2 persistent worker processes per loader (the 2-core budget; workers start in the warm-up pass), and also
in the main process (1 core). The figure is images per
second: labeled items + unlabeled items (each giving a weak and a strong view) per wall second.

The previous path (``LegacyLabeled``/``LegacyUnlabeled`` below) is kept here only for this comparison: it is
the project's transforms before the albumentations port (PIL decode and resize, numpy flip/pad/crop,
torchvision v2 ColorJitter / grayscale / gaussian_blur on float tensors).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from benchmarks.common import fmt_times, time_interleaved
from brpg_lightning.data.datasets.common import PairDataset, Sample
from brpg_lightning.data.transforms import (
    LabeledTransform,
    UnlabeledTransform,
    mask_to_tensor,
    pad_bottom_right,
    to_normalized_tensor,
    to_unit_tensor,
)

CROP = 513
SIZE = (375, 500)  # (H, W)


# --------------------------------------------------------------------------- the previous path
def _u(low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand(()).item())


def _legacy_weak(image: np.ndarray, mask: np.ndarray | None, crop: int) -> tuple[np.ndarray, Any, np.ndarray]:
    f = _u(0.5, 2.0)
    h, w = image.shape[:2]
    size = (max(1, round(w * f)), max(1, round(h * f)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    mask = None if mask is None else np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    if torch.rand(()).item() < 0.5:
        image = image[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    image, mask, valid = pad_bottom_right(image, mask, crop, crop)
    h, w = image.shape[:2]
    y0, x0 = int(torch.randint(0, h - crop + 1, ()).item()), int(torch.randint(0, w - crop + 1, ()).item())
    sl = (slice(y0, y0 + crop), slice(x0, x0 + crop))
    return image[sl], (None if mask is None else mask[sl]), valid[sl]


_JITTER = v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)


def _legacy_strong(image: Tensor) -> Tensor:
    if torch.rand(()).item() < 0.8:
        image = _JITTER(image)
    if torch.rand(()).item() < 0.2:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if torch.rand(()).item() < 0.5:
        sigma = _u(0.1, 2.0)
        k = 2 * math.ceil(3 * sigma) + 1
        image = TF.gaussian_blur(image, [k, k], [sigma, sigma])
    return image.clamp(0.0, 1.0).contiguous()


class LegacySet(Dataset):
    """PIL decoding + the previous transforms."""

    def __init__(self, samples: list[Sample], labeled: bool) -> None:
        self.samples, self.labeled = samples, labeled

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        with Image.open(s.image) as im:
            image = np.array(im.convert("RGB"))
        if self.labeled:
            assert s.mask is not None
            with Image.open(s.mask) as im:
                mask = np.array(im)
            image, mask, _ = _legacy_weak(image, mask, CROP)
            return {"image": to_normalized_tensor(image), "mask": mask_to_tensor(mask)}
        image, _, valid = _legacy_weak(image, None, CROP)
        unit = to_unit_tensor(image)
        return {"image": to_normalized_tensor(unit), "image_strong": to_normalized_tensor(_legacy_strong(unit.clone())),
                "valid": torch.tensor(np.ascontiguousarray(valid))}


# --------------------------------------------------------------------------- data and timing
def write_images(folder: Path, n: int) -> list[Sample]:
    """``n`` smooth 500x375 JPEGs (upsampled low-frequency noise + edges) with 21-class PNG masks."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(low).resize(SIZE[::-1], Image.BICUBIC)).copy()
        mask = np.asarray(Image.fromarray(rng.integers(0, 21, (6, 8), dtype=np.uint8)).resize(SIZE[::-1], Image.NEAREST))
        image[mask == 3] //= 2  # some sharp edges
        Image.fromarray(image).save(folder / f"{i:03d}.jpg", quality=90)
        Image.fromarray(mask).save(folder / f"{i:03d}.png")
        samples.append(Sample(folder / f"{i:03d}.jpg", folder / f"{i:03d}.png", f"{i:03d}"))
    return samples


def loaders(labeled: Dataset, unlabeled: Dataset, workers: int, batch: int) -> list[DataLoader]:
    """The two loaders as the datamodule builds them (persistent workers: started once, in the warm-up)."""
    return [DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False, persistent_workers=workers > 0)
            for ds in (labeled, unlabeled)]


def consume(pair: list[DataLoader]) -> None:
    for loader in pair:
        for _ in loader:
            pass


def run(quick: bool = False) -> list[str]:
    n = 16 if quick else 48
    repeat = 1 if quick else 3
    torch.set_num_threads(1)
    lines = [f"crop {CROP}, {n} labeled + {n} unlabeled 500x375 JPEGs per pass, batch 8; images/s = items/s "
             f"(an unlabeled item = weak + strong view)"]
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_images(Path(tmp), n)
        new_l = PairDataset(samples, 21, LabeledTransform(CROP))
        new_u = PairDataset(samples, 21, UnlabeledTransform(CROP), with_masks=False)
        old_l, old_u = LegacySet(samples, True), LegacySet(samples, False)
        for workers, label in ((2, "2 workers"), (0, "main process")):
            new, old = loaders(new_l, new_u, workers, 8), loaders(old_l, old_u, workers, 8)
            results = time_interleaved({
                "albumentations+OpenCV": lambda p=new: consume(p),
                "PIL+torchvision (previous)": lambda p=old: consume(p),
            }, repeat=repeat, warmup=1)
            del new, old
            speeds = {name: 2 * n / med for name, (med, _) in results.items()}
            for name, (_, times) in results.items():
                lines.append(f"{label:>12}: {name:<28} {speeds[name]:7.1f} images/s  {fmt_times(times)}")
            ratio = speeds["albumentations+OpenCV"] / speeds["PIL+torchvision (previous)"]
            lines.append(f"ratio albumentations / previous ({label}): {ratio:.2f}x")
    return lines
