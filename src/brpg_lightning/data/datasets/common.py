"""What every reader shares: decoding, mask checks, one-line errors from worker processes, and
:class:`PairDataset` over a list of ``(image, mask or None)`` files.

Decoding: images with OpenCV (``cv2.imdecode``, faster than PIL for JPEG and PNG, and what albumentations
works on); masks with PIL, because OpenCV expands palette PNGs (PASCAL's ``SegmentationClass``) to colours
while PIL returns their class indices. A truncated JPEG decodes "successfully" in OpenCV (libjpeg fills the
rest with grey and warns on stderr), so a JPEG without its end-of-image marker is rejected explicitly.

Image size: both decoders refuse huge images, each with its own limit: PIL (masks, headers) at
``PIL.Image.MAX_IMAGE_PIXELS`` (set from ``dataset.max_image_pixels`` by :func:`set_max_image_pixels`), OpenCV
(images) at the environment variable ``OPENCV_IO_MAX_IMAGE_PIXELS`` (default 2**30, read by OpenCV once per
process: it can only be raised before the run starts). :func:`header_size` checks every file against both
before training, naming the file, its size, the limit and how to raise it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError

cv2.setNumThreads(0)  # decoding runs inside DataLoader workers: no nested OpenCV thread pools

MAX_PIXELS_VARIABLE = "BRPG_MAX_IMAGE_PIXELS"
"""Carries ``dataset.max_image_pixels`` to loader workers started by spawn (forked ones inherit PIL's setting)."""
OPENCV_MAX_PIXELS = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))
"""OpenCV's decoding limit (its default 2**30 pixels unless the environment variable raises it)."""


def set_max_image_pixels(limit: int | None) -> None:
    """PIL's decompression-bomb limit for this process and its loader workers (None: no limit)."""
    Image.MAX_IMAGE_PIXELS = None if limit is None else int(limit)
    os.environ[MAX_PIXELS_VARIABLE] = "none" if limit is None else str(int(limit))


if os.environ.get(MAX_PIXELS_VARIABLE):  # a spawned loader worker: the run's limit
    set_max_image_pixels(None if os.environ[MAX_PIXELS_VARIABLE] == "none" else int(os.environ[MAX_PIXELS_VARIABLE]))


def too_large(path: str | Path, what: str, size: tuple[int, int]) -> str | None:
    """Why ``what`` of ``size`` (width, height) is too large to decode here, naming the limit and its key; None if
    it is not."""
    pixels = size[0] * size[1]
    shape = f"{what} '{path}' is {size[0]}x{size[1]} = {pixels} pixels"
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels > limit:
        return (f"{shape}, above dataset.max_image_pixels={limit} (PIL's guard against decompression bombs); "
                f"raise dataset.max_image_pixels if the file is yours, or shrink it")
    if what == "image" and pixels > OPENCV_MAX_PIXELS:
        return (f"{shape}, above OpenCV's limit of {OPENCV_MAX_PIXELS} pixels; set the environment variable "
                f"OPENCV_IO_MAX_IMAGE_PIXELS above {pixels} before starting the run, or shrink it")
    return None


def bomb_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of a file PIL refused as a decompression bomb, read from its header with the limit
    lifted for the call (no pixel is decoded)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return im.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""Image files every lister takes (any case): formats both OpenCV (:func:`read_image`) and PIL
(:func:`image_size`) decode."""
MASK_MODES: tuple[str, ...] = ("L", "P", "I", "I;16", "I;16B", "I;16L")
SHOWN = 5
"""How many examples a message lists (missing files, unmatched names)."""

Transform = Callable[[np.ndarray, "np.ndarray | None"], dict[str, Any]]
"""``transform(image (H, W, 3) uint8, mask (H, W) uint8 or None) -> item dict`` (see ``data.transforms``)."""


class DataItemError(BRPGInputError):
    """A bad file met while loading an item; stays one line when re-raised from a DataLoader worker.

    ``torch.utils.data`` re-raises a worker's exception as ``type(exc)("Caught ... Original Traceback ...")``;
    this class keeps only the original message (the traceback's last line).

    >>> str(DataItemError("Caught DataItemError in DataLoader worker process 0.\\nOriginal Traceback "
    ...     "(most recent call last):\\n  File ...\\nbrpg_lightning.data.datasets.common.DataItemError: bad 'x.png'\\n"))
    "bad 'x.png'"
    """

    def __init__(self, message: str) -> None:
        text = str(message)
        if text.startswith("Caught ") and "Original Traceback" in text:
            last = [ln for ln in text.splitlines() if ln.strip()][-1]
            text = last.split("Error: ", 1)[1] if "Error: " in last else last
        super().__init__(text)


def shown(items: Sequence[Any], n: int = SHOWN) -> str:
    """``'a', 'b', ... (+3 more)`` for messages.

    >>> shown(["a", "b", "c"], 2)
    "'a', 'b' (+1 more)"
    """
    head = ", ".join(f"'{x}'" for x in items[:n])
    return head + (f" (+{len(items) - n} more)" if len(items) > n else "")


def names_in(
    folder: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, *, recursive: bool = False
) -> list[str]:
    """Names of the files with one of ``suffixes`` (any case) in ``folder``, sorted; [] if it is absent.

    Hidden files (and, with ``recursive``, hidden folders) are left out: ``.DS_Store``, macOS ``._x.jpg``
    resource forks and the synthetic set's ``.oracle/`` masks are not images of the set. With ``recursive``,
    names are relative POSIX paths (``sub/x.png``), sorted folder by folder as :class:`~pathlib.Path` sorts;
    symlinked folders are not entered. Plain strings: COCO's 118k names take ~0.1 s this way, ``pathlib``
    objects ~20x longer.

    >>> names_in("/no/such/folder")
    []
    """
    names: list[str] = []
    pending = [("", os.fspath(folder))]
    while pending:
        prefix, current = pending.pop()
        try:
            with os.scandir(current) as entries:
                for e in entries:
                    if e.name.startswith("."):
                        continue
                    if recursive and e.is_dir(follow_symlinks=False):
                        pending.append((f"{prefix}{e.name}/", e.path))
                    elif "." in e.name and e.name[e.name.rfind("."):].lower() in suffixes and e.is_file():
                        names.append(prefix + e.name)
        except (FileNotFoundError, NotADirectoryError):
            if not prefix:
                return []
        except PermissionError:
            if not prefix:
                raise
            # an unreadable sub-folder is passed over, as pathlib's rglob does
    return sorted(names, key=lambda n: n.split("/")) if recursive else sorted(names)


def files_in(
    folder: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, *, recursive: bool = False
) -> list[Path]:
    """:func:`names_in` as paths (``folder / name``)."""
    folder = Path(folder)
    return [folder / name for name in names_in(folder, suffixes, recursive=recursive)]


def check_mask_values(mask: np.ndarray, num_classes: int, path: str | Path) -> None:
    """Raise when ``mask`` holds a value outside ``[0, num_classes)`` that is not ``IGNORE_INDEX`` (255).

    >>> check_mask_values(np.array([[0, 2], [255, 1]]), 3, "m.png")
    >>> check_mask_values(np.array([[0, 3], [7, 255]]), 3, "m.png")
    Traceback (most recent call last):
    ...
    brpg_lightning.data.datasets.common.DataItemError: mask 'm.png' has values [3, 7] outside [0, 3) (255 = ignore is allowed); is dataset.num_classes=3 right?
    """
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        text = ", ".join(str(int(v)) for v in bad[:20]) + (", ..." if bad.size > 20 else "")
        raise DataItemError(
            f"mask '{path}' has values [{text}] outside [0, {num_classes}) ({IGNORE_INDEX} = ignore is allowed); "
            f"is dataset.num_classes={num_classes} right?"
        )


def read_image(path: str | Path) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8 decoded by OpenCV (grey and RGBA converted); one-line error naming the file
    when it cannot be read, is not an image, or is a truncated JPEG."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataItemError(f"image '{path}' cannot be read ({exc.strerror}); expected a readable image file") from None
    if data.size >= 2 and data[0] == 0xFF and data[1] == 0xD8 and b"\xff\xd9" not in data[-4096:].tobytes():
        raise DataItemError(f"image '{path}' is a truncated JPEG (no end-of-image marker); re-extract or remove it")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB) if data.size else None
    except cv2.error as exc:  # OpenCV's size limit (CV_IO_MAX_IMAGE_PIXELS) is an assertion
        reason = too_large(path, "image", image_size(path))
        raise DataItemError(reason or f"image '{path}' cannot be decoded by OpenCV ({exc.err})") from None
    if image is None:
        raise DataItemError(f"image '{path}' cannot be decoded; expected an image file ({' '.join(IMAGE_SUFFIXES)})")
    return image


def palette_to_ids(rgb: np.ndarray, palette: np.ndarray, path: str | Path) -> np.ndarray:
    """``(H, W, 3)`` colour mask -> class ids through ``palette`` (``(C, 3)``); white (255, 255, 255) is 255.

    >>> palette_to_ids(np.array([[[0, 0, 0], [255, 0, 0]]], np.uint8), np.array([[0, 0, 0], [255, 0, 0]]), "m")
    array([[0, 1]], dtype=uint8)
    """
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    table = {int(r) << 16 | int(g) << 8 | int(b): i for i, (r, g, b) in enumerate(palette.tolist())}
    table.setdefault(0xFFFFFF, IGNORE_INDEX)
    values, inverse = np.unique(codes, return_inverse=True)
    unknown = [v for v in values.tolist() if v not in table]
    if unknown:
        colours = ", ".join(f"({v >> 16}, {v >> 8 & 255}, {v & 255})" for v in unknown[:SHOWN])
        raise DataItemError(
            f"mask '{path}' has {len(unknown)} colours not in the classes file palette: {colours}; "
            f"expected only palette colours (white = ignore)"
        )
    return np.array([table[v] for v in values.tolist()], np.uint8)[inverse].reshape(codes.shape)


def read_mask(
    path: str | Path, num_classes: int | None, lut: np.ndarray | None = None, palette: np.ndarray | None = None
) -> np.ndarray:
    """Single-channel class-id mask ``(H, W)`` uint8 (PNG mode L, P — palette indices — or I/I;16).

    ``lut`` (256 entries) maps raw ids first (Cityscapes ``labelIds``); values are then checked against
    ``[0, num_classes)`` and 255 (None: not checked). With ``palette``, RGB masks are decoded by colour.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if palette is not None and im.mode in ("RGB", "RGBA"):
                return palette_to_ids(np.array(im.convert("RGB")), palette, path)
            if im.mode not in MASK_MODES:
                raise DataItemError(
                    f"mask '{path}' has PIL mode {im.mode}; expected a single-channel PNG of class ids (mode L or P)"
                )
            mask = np.array(im)
    except Image.DecompressionBombError:
        raise DataItemError(too_large(path, "mask", bomb_size(path)) or f"mask '{path}' is too large") from None
    except (OSError, SyntaxError) as exc:  # PIL: truncated / not an image
        raise DataItemError(f"mask '{path}' cannot be decoded ({exc}); expected a PNG of class ids") from None
    if lut is not None:
        if mask.min() < 0 or mask.max() > 255:
            raise DataItemError(f"mask '{path}' has ids outside 0..255; expected 8-bit label ids")
        mask = lut[mask]
    if num_classes is not None:
        check_mask_values(mask, num_classes, path)
    return mask.astype(np.uint8)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the file header only (PIL reads no pixels)."""
    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError:
        return bomb_size(path)
    except (OSError, SyntaxError) as exc:
        raise DataItemError(f"file '{path}' cannot be opened as an image ({exc})") from None


def header_size(path: str | Path, what: str) -> tuple[int, int]:
    """``(width, height)`` from the header of ``what`` (image, mask); one line naming the file when it is empty,
    unreadable, no image format PIL knows, or larger than a decoder's limit (:func:`too_large`)."""
    try:
        if os.path.getsize(path) == 0:
            raise DataItemError(f"{what} '{path}' is an empty file (0 bytes); expected an image file")
        with warnings.catch_warnings():  # PIL warns between its limit and twice it: too_large says it below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
    except Image.DecompressionBombError:
        size = bomb_size(path)
    except (OSError, SyntaxError) as exc:
        if "truncated" in str(exc).lower():
            raise DataItemError(f"{what} '{path}' is truncated ({exc}); re-extract or remove it") from None
        reason = "not an image file" if isinstance(exc, Image.UnidentifiedImageError) else str(exc)
        raise DataItemError(f"{what} '{path}' cannot be decoded ({reason}); expected an image file "
                            f"({' '.join(IMAGE_SUFFIXES)})") from None
    reason = too_large(path, what, size)
    if reason is not None:
        raise DataItemError(reason)
    return size


@dataclass(frozen=True)
class Sample:
    """One item: image file, mask file (None for unlabeled) and the name used in batches and messages.

    Paths may be plain strings where a layout lists very many files (COCO's unlabeled complement)."""

    image: Path | str
    mask: Path | str | None
    name: str


class PairDataset(Dataset):
    """Items of a list of :class:`Sample`.

    Without ``transform``: ``{"image": (H, W, 3) uint8, "mask": (H, W) uint8, "name": str}`` (no ``"mask"``
    when ``with_masks`` is False, e.g. unlabeled sets: their mask files are never opened). With ``transform``:
    ``transform(image, mask_or_None)`` plus ``"name"``. Mask values are checked on every load.

    Args:
        samples: the items.
        num_classes: ``C``; mask values must be in ``[0, C)`` or 255.
        transform: see :data:`Transform`.
        with_masks: load masks (every sample must then have one).
        lut: optional 256-entry id map applied to raw masks (Cityscapes ``labelIds``).
        palette: optional ``(C, 3)`` colours: RGB masks are decoded through it (folder layout).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        transform: Transform | None = None,
        with_masks: bool = True,
        lut: np.ndarray | None = None,
        palette: np.ndarray | None = None,
    ) -> None:
        self.samples = list(samples)
        self.num_classes = int(num_classes)
        self.transform = transform
        self.has_masks = bool(with_masks)
        self.lut, self.palette = lut, palette
        if self.has_masks:
            missing = [s.name for s in self.samples if s.mask is None]
            if missing:
                raise BRPGInputError(f"{len(missing)} labeled items have no mask file: {shown(missing)}")
        self.names = [s.name for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw ``(image (H, W, 3) uint8, mask (H, W) uint8 or None)`` of item ``index``."""
        sample = self.samples[index]
        image = read_image(sample.image)
        if not self.has_masks:
            return image, None
        assert sample.mask is not None
        mask = read_mask(sample.mask, self.num_classes, self.lut, self.palette)
        if mask.shape != image.shape[:2]:
            raise DataItemError(
                f"mask '{sample.mask}' is {mask.shape[1]}x{mask.shape[0]} but image '{sample.image}' is "
                f"{image.shape[1]}x{image.shape[0]}; expected the same size"
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

    def mask_value_counts(self, count: int) -> tuple[np.ndarray, int]:
        """Pixel counts of each mask value 0..255 (``IGNORE_INDEX`` included) over the masks of ``count`` evenly
        spaced items (all when ``count >= len``), and how many masks were read. Only masks are decoded (values
        checked as on every load); the images are not."""
        counts = np.zeros(256, np.int64)
        n = len(self)
        if count <= 0 or n == 0 or not self.has_masks:
            return counts, 0
        indices = sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist()))
        for index in indices:
            mask = self.samples[index].mask
            assert mask is not None
            counts += np.bincount(read_mask(mask, self.num_classes, self.lut, self.palette).ravel(), minlength=256)
        return counts, len(indices)

    def check_sample(self, count: int) -> None:
        """Decode ``count`` evenly spaced items (all when ``count >= len``): readable images, mask values and
        sizes. The cheap pre-pass run at setup; every later load checks its own item again."""
        n = len(self)
        if count <= 0 or n == 0:
            return
        self.check_headers()
        for index in sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist())):
            self.load(index)

    def check_headers(self) -> None:
        """Every file's header (PIL's lazy open reads no pixels: about a tenth of a millisecond per file): readable,
        an image format, and each mask the size of its image. A zero-byte file or a text file named ``.png``
        outside the decoded sample would otherwise stop the run mid-epoch."""
        for sample in self.samples:
            size = header_size(sample.image, "image")
            if self.has_masks and sample.mask is not None:
                mask_size = header_size(sample.mask, "mask")
                if mask_size != size:
                    raise DataItemError(
                        f"mask '{sample.mask}' is {mask_size[0]}x{mask_size[1]} but image '{sample.image}' is "
                        f"{size[0]}x{size[1]}; expected the same size"
                    )
