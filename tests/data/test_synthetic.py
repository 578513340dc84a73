"""The embedded synthetic dataset: determinism, layout per split, class content, marker, speed (printed)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.naive_bayes import GaussianNB

from brpg_lightning.data.datasets.synthetic import (
    MARKER_NAME,
    SYNTHETIC_SPLITS,
    generate_synthetic,
    main,
    render_synthetic_image,
    synthetic_class_names,
)
from brpg_lightning.errors import BRPGInputError

SMALL = {"image_size": 40, "train_pool": 20, "val_size": 6}


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` keyed by relative path (marker included)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", seed=3, split="16", **SMALL)
    b = generate_synthetic(tmp_path / "b", seed=3, split="16", **SMALL)
    ha, hb = _hashes(a), _hashes(b)
    # labeled images+masks, unlabeled images, val images+masks, marker (hidden masks only when asked)
    assert len(ha) == 16 * 2 + 4 + 6 * 2 + 1
    assert ha == hb
    c = _hashes(generate_synthetic(tmp_path / "c", seed=3, split="16", **SMALL, oracle_masks=True))
    assert len(c) == len(ha) + 4 and all(c[k] == v for k, v in ha.items())  # + the 4 unlabeled images' masks


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    a = _hashes(generate_synthetic(tmp_path / "a", seed=0, split="16", **SMALL))
    b = _hashes(generate_synthetic(tmp_path / "b", seed=1, split="16", **SMALL))
    images = [k for k in a if "images" in k]
    assert images and all(a[k] != b[k] for k in images)


def test_split_16_layout_labeled_has_masks_unlabeled_has_none(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "s16", seed=0, split=16, **SMALL)  # an int split, as Hydra passes it
    labeled = _names(root / "labeled" / "images")
    assert labeled == [f"pool_{i:04d}.png" for i in range(16)]
    assert _names(root / "labeled" / "masks") == labeled
    assert _names(root / "unlabeled" / "images") == [f"pool_{i:04d}.png" for i in range(16, 20)]
    assert not (root / "unlabeled" / "masks").exists()
    assert _names(root / "val" / "images") == _names(root / "val" / "masks") == [f"val_{i:04d}.png" for i in range(6)]


def test_split_full_labels_the_whole_pool_and_split_only_moves_files(tmp_path: Path) -> None:
    s16 = generate_synthetic(tmp_path / "s16", seed=0, split="16", **SMALL)
    full = generate_synthetic(tmp_path / "full", seed=0, split="full", **SMALL)
    assert len(_names(full / "labeled" / "images")) == len(_names(full / "labeled" / "masks")) == 20
    assert (full / "unlabeled" / "images").is_dir() and _names(full / "unlabeled" / "images") == []
    # the pool is fixed by the seed: the same image bytes, labeled in one split and unlabeled in the other
    for name in ("pool_0000.png", "pool_0015.png"):
        assert (s16 / "labeled/images" / name).read_bytes() == (full / "labeled/images" / name).read_bytes()
        assert (s16 / "labeled/masks" / name).read_bytes() == (full / "labeled/masks" / name).read_bytes()
    assert (s16 / "unlabeled/images/pool_0019.png").read_bytes() == (full / "labeled/images/pool_0019.png").read_bytes()
    assert _hashes(s16 / "val") == _hashes(full / "val")


def test_masks_hold_only_class_ids_and_images_are_rgb(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "r", seed=0, split="16", num_classes=5, **SMALL)
    for sub in ("labeled", "val"):
        for name in _names(root / sub / "masks"):
            with Image.open(root / sub / "masks" / name) as m:
                assert m.mode == "L" and m.size == (40, 40)
                values = set(np.unique(np.asarray(m)).tolist())
            assert values <= set(range(5)), (name, values)
            with Image.open(root / sub / "images" / name) as im:
                assert im.mode == "RGB" and im.size == (40, 40)


def test_every_class_appears_in_val_and_in_labeled_16(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "r", seed=0, split="16", image_size=48, train_pool=16, val_size=24)
    for sub in ("val", "labeled"):
        seen: set[int] = set()
        for name in _names(root / sub / "masks"):
            with Image.open(root / sub / "masks" / name) as m:
                seen |= set(np.unique(np.asarray(m)).tolist())
        assert seen == set(range(7)), (sub, seen)


def test_more_classes_than_shapes_and_class_names() -> None:
    names = synthetic_class_names(10)
    assert len(names) == 10 and len(set(names)) == 10 and names[0] == "background"
    seen: set[int] = set()
    for i in range(30):
        _, mask = render_synthetic_image(np.random.default_rng(i), 48, 10)
        seen |= set(np.unique(mask).tolist())
    assert seen == set(range(10))


def test_colour_alone_does_not_identify_the_object_class(tmp_path: Path) -> None:
    """Class identity lives in shape/texture: a per-pixel colour classifier stays near chance (1/6)."""
    root = generate_synthetic(tmp_path / "r", seed=0, split="16", image_size=48, train_pool=16, val_size=40)
    xs, ys = [], []
    for name in _names(root / "val" / "masks"):
        xs.append(np.asarray(Image.open(root / "val" / "images" / name), dtype=np.float64).reshape(-1, 3))
        ys.append(np.asarray(Image.open(root / "val" / "masks" / name)).reshape(-1))
    half = len(xs) // 2
    x_tr, y_tr = np.concatenate(xs[:half]), np.concatenate(ys[:half])
    x_te, y_te = np.concatenate(xs[half:]), np.concatenate(ys[half:])
    fit, test = y_tr > 0, y_te > 0
    clf = GaussianNB().fit(x_tr[fit], y_tr[fit])
    accuracy = float((clf.predict(x_te[test]) == y_te[test]).mean())
    assert accuracy < 0.3, accuracy


def test_marker_skips_a_second_generation_and_mismatch_regenerates(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "r", seed=0, split="16", **SMALL)
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["seed"] == 0 and marker["split"] == "16" and marker["class_names"] == synthetic_class_names(7)
    probe = root / "val" / "images" / "val_0000.png"
    original = probe.read_bytes()
    probe.write_bytes(b"tampered")
    assert generate_synthetic(root, seed=0, split="16", **SMALL) == root  # marker matches: nothing rewritten
    assert probe.read_bytes() == b"tampered"
    generate_synthetic(root, seed=0, split="16", force=True, **SMALL)
    assert probe.read_bytes() == original
    generate_synthetic(root, seed=0, split="32", image_size=40, train_pool=40, val_size=6)  # mismatch
    assert len(_names(root / "labeled" / "images")) == 32 and len(_names(root / "unlabeled" / "images")) == 8


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "user" / "labeled" / "images").mkdir(parents=True)
    (tmp_path / "user" / "labeled" / "images" / "mine.png").write_bytes(b"x")
    with pytest.raises(BRPGInputError, match="not written by generate_synthetic"):
        generate_synthetic(tmp_path / "user", **SMALL)
    assert (tmp_path / "user" / "labeled" / "images" / "mine.png").exists()


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"split": "17"}, "split '17' is not valid for dataset 'synthetic'; valid splits: 16, 32, full"),
    ({"split": "32", "train_pool": 20}, "needs train_pool >= 32"),
    ({"num_classes": 1}, "num_classes=1"),
])
def test_bad_arguments_are_one_line_errors(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    args = {**SMALL, **kwargs}
    with pytest.raises(BRPGInputError) as err:
        generate_synthetic(tmp_path / "r", **args)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_cli_writes_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path / "cli"), "--seed", "0", "--split", "full", "--image-size", "32",
          "--train-pool", "16", "--val-size", "2"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert len(_names(tmp_path / "cli" / "labeled" / "masks")) == 16


def test_default_size_generation_counts_and_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Default parameters (400 + 128 images at 96x96); the time is printed, not asserted."""
    start = time.perf_counter()
    root = generate_synthetic(tmp_path / "default", seed=0, split="16")
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[synthetic] default generation (400 + 128 images, 96x96): {elapsed:.2f} s")
    assert len(_names(root / "labeled" / "images")) == len(_names(root / "labeled" / "masks")) == 16
    assert len(_names(root / "unlabeled" / "images")) == 384
    assert len(_names(root / "val" / "masks")) == 128
    assert SYNTHETIC_SPLITS == ("16", "32", "full")
    start = time.perf_counter()
    generate_synthetic(tmp_path / "default", seed=0, split="16")
    with capsys.disabled():
        print(f"[synthetic] second call (marker matches): {time.perf_counter() - start:.4f} s")


def _generate_and_hash(root: str) -> dict[str, str]:
    return _hashes(generate_synthetic(Path(root), seed=3, split="16", **SMALL))


def test_runs_started_side_by_side_share_one_generation(tmp_path: Path) -> None:
    """Two processes asking for the same uncached set at once: one generates, the other waits for the
    marker; both then read complete, identical files (before the lock one read a half-written PNG)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        first, second = pool.map(_generate_and_hash, [str(tmp_path / "s")] * 2)
    assert first == second == _hashes(generate_synthetic(tmp_path / "ref", seed=3, split="16", **SMALL))
