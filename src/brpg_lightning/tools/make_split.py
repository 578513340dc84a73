"""Seeded labeled/unlabeled splits in the published format, for any dataset preset.

::

    python -m brpg_lightning.tools.make_split dataset=<pascal|cityscapes|coco|folder> dataset.root=<path> \\
        labeled=<count or fraction> seed=<n> out=<dir> [name=<split name>] [other dataset.* overrides]

writes ``<out>/<name>/labeled.txt``, ``<out>/<name>/unlabeled.txt`` and ``<out>/val.txt`` in the dataset's
line format (PASCAL ids, Cityscapes / folder relative image paths, COCO ``<image> <mask>`` pairs), then train
with ``dataset.split_dir=<out> split=<name>``. ``name`` defaults to the labeled count.

The labeled images are ``labeled`` of the dataset's labeled candidates (images with a mask: PASCAL
``<mask_dir>`` minus ``ImageSets/Segmentation/val.txt`` — set ``dataset.mask_dir=SegmentationClass`` for the
classic setting; Cityscapes ``leftImg8bit/train``; COCO ``train2017`` with a mask; folder ``labeled/images``),
drawn by ``numpy.random.default_rng(seed).choice`` without replacement (same arguments, same files); every
other training image is unlabeled. An existing split with other contents is never overwritten.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from brpg_lightning.cli import exit_on_bad_input
from brpg_lightning.config import config_dir, register_resolvers
from brpg_lightning.data.datasets.layout import Layout
from brpg_lightning.data.splits import make_layout
from brpg_lightning.errors import BRPGInputError

TOOL_KEYS = ("labeled", "seed", "out", "name")
USAGE = ("usage: python -m brpg_lightning.tools.make_split dataset=<name> dataset.root=<path> "
         "labeled=<count or fraction> seed=<n> out=<dir> [name=<split>]")


def labeled_count(value: str, pool: int) -> int:
    """``"92"`` -> 92; ``"0.125"`` -> ``round(0.125 * pool)``; checked against ``1 <= n <= pool``.

    >>> labeled_count("0.25", 10), labeled_count("3", 10)
    (2, 3)
    """
    try:
        number = float(value)
    except ValueError:
        raise BRPGInputError(f"labeled={value!r}; expected a count (92) or a fraction (0.125)") from None
    count = round(number * pool) if "." in value or "e" in value.lower() else int(number)
    if not 1 <= count <= pool:
        raise BRPGInputError(f"labeled={value} gives {count} images; expected 1..{pool} (labeled candidates found)")
    return count


def draw_split(layout: Layout, labeled: str, seed: int) -> tuple[list[str], list[str], list[str]]:
    """``(labeled lines, unlabeled lines, val lines)`` of a seeded split of ``layout``."""
    layout.check_root()
    pool = layout.train_pool()
    if not pool:
        raise BRPGInputError(f"dataset root '{layout.root}' holds no labeled candidates; expected the layout {layout.tree}")
    count = labeled_count(str(labeled), len(pool))
    picked = np.random.default_rng(int(seed)).choice(len(pool), size=count, replace=False)
    chosen = {str(pool[i].image) for i in picked.tolist()}
    labeled_lines = sorted(layout.line(pool[i]) for i in picked.tolist())
    unlabeled_lines = [layout.line(s) for s in layout.train_images() if str(s.image) not in chosen]
    val_lines = [layout.line(s) for s in layout.val_samples()]
    return labeled_lines, unlabeled_lines, val_lines


def seed_value(value: str) -> int:
    """``seed=<n>``: a non-negative integer (numpy's ``default_rng`` takes no negative seed).

    >>> seed_value("7")
    7
    >>> seed_value("-1")
    Traceback (most recent call last):
    ...
    brpg_lightning.errors.BRPGInputError: seed=-1; expected an integer >= 0
    """
    try:
        seed = int(value)
    except ValueError:
        raise BRPGInputError(f"seed={value!r}; expected an integer >= 0") from None
    if seed < 0:
        raise BRPGInputError(f"seed={value}; expected an integer >= 0")
    return seed


def split_text(lines: list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


def check_outputs(files: dict[Path, str]) -> None:
    """Refuse before anything is written: an output that exists with other contents (never overwritten), or
    one that is a folder; so a refused run leaves no half-written split behind."""
    for path, text in files.items():
        if path.exists() and (not path.is_file() or path.read_text() != text):
            raise BRPGInputError(
                f"'{path}' exists with other contents; choose another out= or name= (never overwritten)"
            )


def write_lines(path: Path, lines: list[str]) -> None:
    text = split_text(lines)
    check_outputs({path: text})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments into the tool's own keys and Hydra overrides."""
    own: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise BRPGInputError(f"argument {arg!r}; expected key=value ({USAGE})")
        if key in TOOL_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    for key in ("labeled", "out"):
        if key not in own:
            raise BRPGInputError(f"{key}= is missing; {USAGE}")
    return own, overrides


def make_split(argv: list[str]) -> Path:
    """Run the tool; returns the split folder written."""
    own, overrides = parse(argv)
    seed = seed_value(own.get("seed", "0"))
    register_resolvers()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    ds = cfg.dataset
    layout = make_layout(str(ds.get("layout") or "folder"), str(ds.root), ds.get("mask_dir"), ds.get("label_format"))
    labeled, unlabeled, val = draw_split(layout, own["labeled"], seed)
    out = Path(own["out"])
    name = own.get("name") or str(len(labeled))
    files = {out / name / "labeled.txt": labeled, out / name / "unlabeled.txt": unlabeled, out / "val.txt": val}
    check_outputs({path: split_text(lines) for path, lines in files.items()})  # every output, then any write
    for path, lines in files.items():
        write_lines(path, lines)
    print(f"split '{name}' of {layout.name} '{layout.root}': {len(labeled)} labeled, {len(unlabeled)} unlabeled, "
          f"{len(val)} val -> {out / name} (train with dataset.split_dir={out} split={name})")
    return out / name


@exit_on_bad_input
def main(argv: list[str] | None = None) -> None:
    make_split(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
