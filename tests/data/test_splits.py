"""Split folders and ``tools.make_split``; every bad input of a dataset gets one line before training."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from brpg_lightning.data.datamodule import SemiSupervisedDataModule
from brpg_lightning.data.splits import resolve_split_name
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.tools.make_split import main as make_split_main
from brpg_lightning.tools.make_split import make_split
from tests.data.test_readers import dm
from tests.data.trees import cityscapes_tree, coco_tree, pascal_ids, pascal_tree


def one_line(fn: Callable[[], object]) -> str:
    with pytest.raises(BRPGInputError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    return message


def setup_fit(d: SemiSupervisedDataModule) -> None:
    d.setup("fit")


# ----------------------------------------------------------------------------- layout and split files
@pytest.mark.parametrize(("name", "tree", "folder"), [
    ("pascal", "JPEGImages/<id>.jpg", "SegmentationClassAug"),
    ("cityscapes", "gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png", "gtFine/train"),
    ("coco", "<root>/masks/<id>.png", "masks"),
])
def test_missing_root_and_wrong_layout_print_the_expected_tree(tmp_path: Path, name: str, tree: str, folder: str) -> None:
    missing = tmp_path / "nowhere"
    missing_root = one_line(lambda: setup_fit(dm(name, missing, "x", split_dir=str(tmp_path))))
    assert f"'{missing}' does not exist" in missing_root and tree in missing_root
    root = {"pascal": lambda p: pascal_tree(p)[0], "cityscapes": lambda p: cityscapes_tree(p)[0], "coco": coco_tree}[name](
        tmp_path / name
    )
    shutil.rmtree(root / folder)
    split = {"pascal": "92", "cityscapes": "372", "coco": "1_128"}[name]
    wrong = one_line(lambda: setup_fit(dm(name, root, split)))
    assert f"has no folder '{folder}'" in wrong and tree in wrong


def test_split_dir_and_split_folder_and_files_must_exist(tmp_path: Path) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    assert "dataset.split_dir" in one_line(lambda: SemiSupervisedDataModule("pascal", str(root), 21, "92", layout="pascal"))
    assert "nope' does not exist" in one_line(lambda: setup_fit(dm("pascal", root, "92", split_dir=str(tmp_path / "nope"))))
    message = one_line(lambda: setup_fit(dm("pascal", root, "366")))
    assert "split folder" in message and "splits in" in message and "92" in message
    (root / "splits" / "92" / "labeled.txt").unlink()
    message = one_line(lambda: setup_fit(dm("pascal", root, "92")))
    assert f"split file '{root / 'splits' / '92' / 'labeled.txt'}' does not exist" in message


def test_hydra_integer_reading_of_coco_split_names_maps_back(tmp_path: Path) -> None:
    for name in ("1_128", "1_16", "372"):
        (tmp_path / name).mkdir()
    assert resolve_split_name(tmp_path, "1128") == "1_128"  # what Hydra makes of split=1_128
    assert resolve_split_name(tmp_path, "372") == "372" and resolve_split_name(tmp_path, "999") == "999"


def test_folder_split_other_than_folder_needs_split_lists(folder_tree) -> None:
    root = folder_tree()
    message = one_line(lambda: SemiSupervisedDataModule("folder", str(root), 3, "10"))
    assert "split=10 needs dataset.split_dir" in message


def test_split_naming_absent_images_gives_count_and_examples(tmp_path: Path) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    lab, unl, _ = pascal_ids()
    for i in unl[:3]:
        (root / "JPEGImages" / f"{i}.jpg").unlink()
    message = one_line(lambda: setup_fit(dm("pascal", root, "92")))
    assert "unlabeled.txt' names 3 files that do not exist" in message
    assert str(root / "JPEGImages" / f"{unl[0]}.jpg") in message
    (root / "SegmentationClassAug" / f"{lab[1]}.png").unlink()  # a labeled image without its mask
    message = one_line(lambda: setup_fit(dm("pascal", root, "92")))
    assert "labeled.txt' names 1 files" in message and f"{lab[1]}.png" in message


def test_classic_setting_names_labeled_ids_without_fine_masks(tmp_path: Path) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    lab, unl, val = pascal_ids()
    (root / "splits" / "92" / "labeled.txt").write_text(f"{lab[0]}\n{unl[0]}\n")  # unl[0] has no fine mask
    (root / "splits" / "92" / "unlabeled.txt").write_text("".join(f"{i}\n" for i in unl[1:]))
    message = one_line(lambda: setup_fit(dm("pascal", root, "92", mask_dir="SegmentationClass")))
    assert f"SegmentationClass/{unl[0]}.png" in message


def test_empty_split_files(tmp_path: Path) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    (root / "splits" / "92" / "labeled.txt").write_text("\n")
    assert "labeled.txt' is empty" in one_line(lambda: setup_fit(dm("pascal", root, "92")))
    root2, _ = pascal_tree(tmp_path / "voc2")
    (root2 / "splits" / "92" / "unlabeled.txt").write_text("")
    assert "unlabeled.txt' is empty" in one_line(lambda: setup_fit(dm("pascal", root2, "92")))
    supervised = dm("pascal", root2, "92", use_unlabeled=False)  # SupOnly may have no unlabeled images
    supervised.setup("fit")
    assert supervised.iterations_per_epoch == 1  # 3 labeled // 2


def test_labeled_unlabeled_overlap(tmp_path: Path) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    lab, unl, _ = pascal_ids()
    (root / "splits" / "92" / "unlabeled.txt").write_text("".join(f"{i}\n" for i in [*unl, lab[0], lab[2]]))
    message = one_line(lambda: setup_fit(dm("pascal", root, "92")))
    assert "2 images are both in" in message and f"{lab[0]}.jpg" in message


# ----------------------------------------------------------------------------- pixels: sampled pre-pass
def test_bad_mask_values_are_named_before_training(tmp_path: Path) -> None:
    root, _ = cityscapes_tree(tmp_path / "city")
    d = dm("cityscapes", root, "372")  # trainIds: 0..18, 255
    first = d.layout.sample((root / "splits" / "372" / "labeled.txt").read_text().split()[0])
    bad = np.zeros((12, 16), np.uint8)
    bad[0, 0], bad[1, 1], bad[2, 2] = 19, 33, 255
    Image.fromarray(bad).save(first.mask)
    message = one_line(lambda: setup_fit(d))
    assert str(first.mask) in message and "values [19, 33] outside [0, 19)" in message
    assert "dataset.num_classes=19" in message


def test_image_and_mask_of_different_sizes(tmp_path: Path) -> None:
    root = coco_tree(tmp_path / "coco")
    line = (root / "splits" / "val.txt").read_text().split("\n")[0]
    mask = root / line.split()[1]
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(mask)
    message = one_line(lambda: setup_fit(dm("coco", root, "1_128")))
    assert str(mask) in message and "7x5" in message and "16x12" in message


@pytest.mark.parametrize("damage", ["truncated_jpeg", "not_an_image"])
def test_unreadable_image_names_the_file(tmp_path: Path, damage: str) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    lab, _, _ = pascal_ids()
    path = root / "JPEGImages" / f"{lab[0]}.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated_jpeg" else b"this is not a jpeg")
    message = one_line(lambda: setup_fit(dm("pascal", root, "92")))
    assert str(path) in message
    assert ("truncated" if damage == "truncated_jpeg" else "cannot be decoded") in message


def test_pre_pass_is_sampled_and_later_loads_still_check(tmp_path: Path) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    _, unl, _ = pascal_ids()
    d = dm("pascal", root, "92", check_items=1, num_workers=1)  # pre-pass decodes only the first unlabeled image
    d.setup("fit")
    bad = root / "JPEGImages" / f"{d.unlabeled_set.names[-1]}.jpg"
    bad.write_bytes(b"garbage")
    loader = DataLoader(d.unlabeled_set, batch_size=1, num_workers=1)
    message = one_line(lambda: list(loader))  # raised in a worker process, still one line
    assert message.startswith(f"image '{bad}' cannot be decoded")


def test_full_split_name_checks_do_not_decode_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    decoded: list[str] = []
    import brpg_lightning.data.datasets.common as common

    real = common.read_image
    monkeypatch.setattr(common, "read_image", lambda p: decoded.append(Path(p).stem) or real(p))
    dm("pascal", root, "92", check_items=2).setup("fit")
    assert len(decoded) == 2 + 2 + 2  # labeled, unlabeled, val: 2 each out of 3 + 4 + 2 listed


# ----------------------------------------------------------------------------- make_split
def test_make_split_is_seeded_disjoint_and_loadable(tmp_path: Path) -> None:
    root, _ = cityscapes_tree(tmp_path / "city")
    common = ["dataset=cityscapes", f"dataset.root={root}", "seed=3"]
    a = make_split([*common, "labeled=3", f"out={tmp_path / 'a'}"])
    b = make_split([*common, "labeled=3", f"out={tmp_path / 'b'}"])
    assert a.name == "3"
    for f in ("labeled.txt", "unlabeled.txt"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    labeled = (a / "labeled.txt").read_text().split()
    unlabeled = (a / "unlabeled.txt").read_text().split()
    train = sorted(p.relative_to(root).as_posix() for p in (root / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
    assert len(labeled) == 3 and not set(labeled) & set(unlabeled) and sorted(labeled + unlabeled) == train
    assert sorted((tmp_path / "a" / "val.txt").read_text().split()) == sorted(
        p.relative_to(root).as_posix() for p in (root / "leftImg8bit" / "val").rglob("*.png")
    )
    others = {tuple(make_split([*common[:2], f"seed={s}", "labeled=0.5", f"out={tmp_path / str(s)}"])
                    .joinpath("labeled.txt").read_text().split()) for s in range(4)}
    assert len(others) > 1 and all(len(o) == 3 for o in others)  # 0.5 of 6 train images, seed-dependent
    d = dm("cityscapes", root, "3", split_dir=str(tmp_path / "a"))
    d.setup("fit")
    assert sorted(s.image.relative_to(root).as_posix() for s in d.labeled_set.samples) == sorted(labeled)


def test_make_split_pascal_classic_and_coco_formats(tmp_path: Path) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    out = make_split(["dataset=pascal", f"dataset.root={root}", "dataset.mask_dir=SegmentationClass", "labeled=2",
                      f"out={tmp_path / 'p'}", "name=two"])
    lab, unl, val = pascal_ids()
    labeled = (out / "labeled.txt").read_text().split()
    assert set(labeled) <= set(lab)  # classic: drawn from the fine-mask ids (not val)
    assert sorted(labeled + (out / "unlabeled.txt").read_text().split()) == sorted(lab + unl)
    assert (tmp_path / "p" / "val.txt").read_text().split() == val
    coco = coco_tree(tmp_path / "coco")
    out = make_split(["dataset=coco", f"dataset.root={coco}", "labeled=1", f"out={tmp_path / 'c'}"])
    line = (out / "labeled.txt").read_text().strip()
    image, mask = line.split()
    assert image.startswith("train2017/") and mask == f"masks/{Path(image).stem}.png"


def test_make_split_folder_layout_then_train_lists(tmp_path: Path, folder_tree) -> None:
    root = folder_tree(n_labeled=4, n_unlabeled=3)
    out = make_split(["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3", "labeled=2", "seed=0",
                      f"out={tmp_path / 's'}"])
    labeled = (out / "labeled.txt").read_text().split()
    unlabeled = (out / "unlabeled.txt").read_text().split()
    assert all(x.startswith("labeled/images/") for x in labeled) and len(unlabeled) == 2 + 3
    d = SemiSupervisedDataModule("folder", str(root), 3, "2", split_dir=str(tmp_path / "s"), crop_size=8,
                                 batch_size_labeled=2, batch_size_unlabeled=2)
    d.setup("fit")
    assert len(d.labeled_set) == 2 and len(d.unlabeled_set) == 5 and len(d.val_set) == 2


def test_make_split_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    with pytest.raises(SystemExit) as exit_info:
        make_split_main(["dataset=pascal", f"dataset.root={root}", "labeled=500", f"out={tmp_path / 'o'}"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: labeled=500 gives 500 images; expected 1..")
    out = make_split(["dataset=pascal", f"dataset.root={root}", "labeled=2", f"out={tmp_path / 'o'}", "name=x"])
    (out / "labeled.txt").write_text("edited\n")
    assert "never overwritten" in one_line(
        lambda: make_split(["dataset=pascal", f"dataset.root={root}", "labeled=2", f"out={tmp_path / 'o'}", "name=x"])
    )
