"""The one image lister (``common.names_in`` / ``files_in``) behind the folder reader, the split layouts and
``predict``: accepted suffixes in any case, hidden files skipped, sorted, recursion for ``predict``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brpg_lightning.data.datasets.common import IMAGE_SUFFIXES, files_in, names_in
from brpg_lightning.data.datasets.folder import FolderDataset
from brpg_lightning.errors import BRPGInputError


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def test_suffixes_are_the_union_of_the_former_listers() -> None:
    # folder reader and layouts took png/jpg/jpeg; predict also bmp/tif/tiff/webp
    assert set(IMAGE_SUFFIXES) == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def test_suffixes_any_case_hidden_and_other_files_skipped_sorted(tmp_path: Path) -> None:
    _touch(tmp_path, "b.PNG", "a.jpg", "c.Jpeg", "d.webp", "e.TIF", "f.tiff", "g.bmp",
           ".hidden.png", "._a.jpg", ".png", "notes.txt", "png", "trailing.", "x.png.txt")
    (tmp_path / "dir.png").mkdir()  # a folder is not an image, whatever its name
    assert names_in(tmp_path) == ["a.jpg", "b.PNG", "c.Jpeg", "d.webp", "e.TIF", "f.tiff", "g.bmp"]
    assert files_in(tmp_path) == [tmp_path / n for n in names_in(tmp_path)]
    assert names_in(tmp_path, (".png",)) == ["b.PNG"]


def test_not_recursive_by_default_and_missing_folder_is_empty(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png", "sub/b.png")
    assert names_in(tmp_path) == ["a.png"]
    assert names_in(tmp_path / "absent") == [] and files_in(tmp_path / "a.png") == []


def test_recursive_skips_hidden_folders_and_sorts_like_paths(tmp_path: Path) -> None:
    _touch(tmp_path, "z.png", "a/b.png", "a-b.png", "a/c/d.JPG", ".oracle/m.png", "a/.cache/x.png", "a/n.txt")
    names = names_in(tmp_path, recursive=True)
    assert names == ["a/b.png", "a/c/d.JPG", "a-b.png", "z.png"]
    assert files_in(tmp_path, recursive=True) == sorted(tmp_path / n for n in names)  # pathlib's order


def test_folder_dataset_takes_every_suffix_in_any_case(tmp_path: Path) -> None:
    for sub in ("images", "masks"):
        (tmp_path / "val" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.BMP", "b.webp", "c.tif", "d.Png"):
        Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(tmp_path / "val" / "images" / name)
        Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "val" / "masks" / (Path(name).stem + ".png"))
    (tmp_path / "val" / "images" / "._a.jpg").write_bytes(b"resource fork")
    (tmp_path / "val" / "masks" / ".x.png").write_bytes(b"")
    ds = FolderDataset(tmp_path, "val", num_classes=2)
    assert ds.names == ["a", "b", "c", "d"]
    assert all(ds[i]["image"].shape == (5, 6, 3) for i in range(4))


def test_predict_lists_a_file_or_a_folder_without_the_output(tmp_path: Path) -> None:
    from brpg_lightning.predict import list_images

    _touch(tmp_path, "in/a.png", "in/sub/b.webp", "in/out/masks/a.png", "in/.ipynb_checkpoints/c.png", "in/n.txt")
    assert list_images(tmp_path / "in", exclude=tmp_path / "in" / "out") == [
        tmp_path / "in" / "a.png", tmp_path / "in" / "sub" / "b.webp"
    ]
    assert list_images(tmp_path / "in" / "n.txt") == [tmp_path / "in" / "n.txt"]  # a named file is taken as is
    _touch(tmp_path, "empty/n.txt")
    with pytest.raises(BRPGInputError, match="no images found"):
        list_images(tmp_path / "empty")
