"""User mistakes: each stops before the work with exit status 2, exactly one ``error:`` line naming the key, file
or value, no traceback, and every file the user made unchanged (hashed before and after).

One table of cases run in-process through the CLI's own exit path (``cli.exit_on_bad_input``); subprocesses only
where the path before the task matters (Hydra's start-up), one per entry point.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brpg_lightning.cli import exit_on_bad_input
from tests.conftest import compose_cfg

ENV = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}

FOLDER_RUN = (
    "dataset=folder",
    "dataset.crop_size=16",
    "dataset.batch_size_labeled=2",
    "dataset.batch_size_unlabeled=2",
    "dataset.batch_size_val=2",
    "dataset.num_workers=0",
    "dataset.persistent_workers=false",
    "trainer.max_epochs=2",  # BRPG's sampling (T_S1=1) must start before the last epoch
    "trainer.accelerator=cpu",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=1",
    "callbacks.progress_bar.refresh_rate=0",
    "model.weights_path=null",
)
"""A folder-layout run small enough to reach the datamodule's setup in seconds (it never gets further here)."""


def tree_hashes(*roots: Path) -> dict[str, str]:
    """``{path: sha256}`` of every file under ``roots`` (a missing root hashes as nothing)."""
    out = {}
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def folder_data(root: Path, masks: list[np.ndarray], n_unlabeled: int = 4) -> Path:
    """``<root>/{labeled,unlabeled,val}`` with 16x16 images; one labeled image per mask, val masks like the first."""
    rng = np.random.default_rng(0)
    for sub in ("labeled/images", "labeled/masks", "unlabeled/images", "val/images", "val/masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "labeled/images" / f"l{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "labeled/masks" / f"l{i}.png")
    for i in range(n_unlabeled):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "unlabeled/images" / f"u{i}.png")
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "val/images" / f"v{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "val/masks" / f"v{i}.png")
    return root


def png_bytes(array: np.ndarray) -> bytes:
    """``array`` encoded as a PNG file's bytes."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (CRC recomputed): PIL reads the size from the header
    alone, so a huge image costs a few bytes here."""
    import struct
    import zlib

    data = bytearray(png_bytes(np.zeros((1, 1), np.uint8)))
    start = 8 + 4  # signature, IHDR length
    assert data[start : start + 4] == b"IHDR"
    data[start + 4 : start + 12] = struct.pack(">II", width, height)
    data[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start : start + 17])))
    return bytes(data)


def binary(foreground: int, background: int | None = 0) -> list[np.ndarray]:
    """Four masks: a square of ``foreground`` on ``background`` (None: all ``foreground``)."""
    masks = []
    for i in range(4):
        m = np.full((16, 16), foreground if background is None else background, np.uint8)
        m[2 + i : 10 + i, 3:11] = foreground
        masks.append(m)
    return masks


def finished_run(run: Path) -> Path:
    """A run directory as a finished run leaves it (Hydra's files, checkpoints, metrics, CSV log)."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights of the finished run")
    (run / "metrics.json").write_text('{"final_mIoU": 0.61}')
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("epoch,val/mIoU\n0,0.61\n")
    (run / "train.log").write_text("the finished run's log\n")
    return run


@dataclass
class Case:
    """``call(tmp_path) -> (function, argument, files to keep)``: ``exit_on_bad_input(function)(argument)`` must
    exit 2 with one ``error:`` line holding every string of ``names``."""

    call: Callable[[Path], tuple[Callable, object, list[Path]]]
    names: tuple[str, ...]


def _train_into_finished_run(tmp: Path):
    from brpg_lightning.train import run

    target = finished_run(tmp / "runs" / "89")
    return run, compose_cfg(*FOLDER_RUN, "dataset.num_classes=2", f"dataset.root={tmp / 'none'}",
                            output_dir=target), [target]


def _train_from_another_runs_checkpoint(tmp: Path):
    from brpg_lightning.train import run

    target = finished_run(tmp / "runs" / "89")
    other = finished_run(tmp / "runs" / "90")
    cfg = compose_cfg(*FOLDER_RUN, "dataset.num_classes=2", f"ckpt_path={other / 'checkpoints' / 'last.ckpt'}",
                      output_dir=target)
    return run, cfg, [target, other]


def _train_data(masks: list[np.ndarray], num_classes: int, n_unlabeled: int = 4, *extra: str):
    def call(tmp: Path):
        from brpg_lightning.train import run

        data = folder_data(tmp / "data", masks, n_unlabeled)
        cfg = compose_cfg(*FOLDER_RUN, f"dataset.num_classes={num_classes}", f"dataset.root={data}", *extra,
                          output_dir=tmp / "run")
        return run, cfg, [data]

    return call


def _train_bad_file(relative: str, content: bytes):
    """A folder run whose ``relative`` file holds ``content``, outside the one item decoded up front."""

    def call(tmp: Path):
        from brpg_lightning.train import run

        data = folder_data(tmp / "data", binary(1))
        (data / relative).write_bytes(content)
        cfg = compose_cfg(*FOLDER_RUN, "dataset.num_classes=2", f"dataset.root={data}", "dataset.check_items=1",
                          output_dir=tmp / "run")
        return run, cfg, [data]

    return call


def _train_with_file(key: str, write: Callable[[Path], None], *extra: str):
    """A folder run with ``key`` set to a file ``write`` makes."""

    def call(tmp: Path):
        from brpg_lightning.train import run

        data = folder_data(tmp / "data", binary(1))
        path = tmp / "given" / "file"
        path.parent.mkdir()
        write(path)
        cfg = compose_cfg(*FOLDER_RUN, "dataset.num_classes=2", f"dataset.root={data}", f"{key}={path}", *extra,
                          output_dir=tmp / "run")
        return run, cfg, [data, path.parent]

    return call


def _checkpoint_of(*overrides: str):
    """``write(path)``: a checkpoint as a run of ``FOLDER_RUN`` plus ``overrides`` leaves it (its module's weights,
    untrained, and its run config), without training."""

    def write(path: Path) -> None:
        import torch
        from omegaconf import OmegaConf

        from brpg_lightning.train import build_module

        cfg = compose_cfg(*FOLDER_RUN, "dataset.num_classes=2", f"dataset.root={path.parent}", *overrides,
                          output_dir=path.parent / "r")
        module = build_module(cfg, class_names=[f"c{i}" for i in range(int(cfg.dataset.num_classes))])
        torch.save({"state_dict": module.state_dict(), "epoch": 1, "global_step": 4,
                    "hyper_parameters": {"run_config": OmegaConf.to_container(cfg, resolve=True)}}, path)

    return write


def _truncated_checkpoint(path: Path) -> None:
    _checkpoint_of()(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickled_object(path: Path) -> None:
    import argparse

    import torch

    torch.save({"args": argparse.Namespace(lr=0.1)}, path)


def _predict_colliding_stems(tmp: Path):
    from brpg_lightning.predict import run

    inp = tmp / "photos"
    (inp / "sub").mkdir(parents=True)
    for name in ("a.jpg", "a.png", "sub/a.jpg", "b.png"):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(inp / name)
    ckpt = tmp / "model.ckpt"
    ckpt.write_bytes(b"never read: the inputs are checked first")
    out = tmp / "preds"
    cfg = compose_cfg(f"ckpt_path={ckpt}", f"input={inp}", f"output={out}", "progress=false",
                      config_name="predict")
    return run, cfg, [inp, out]


def _evaluate_into_unwritable_folder(tmp: Path):
    from brpg_lightning.evaluate import run

    ckpt = tmp / "ckpts" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"never read: the report folder is checked first")
    # /proc refuses new files even to root (permission bits alone do not stop root)
    cfg = compose_cfg(f"ckpt_path={ckpt}", "output=/proc/self/brpg-reports", "trainer.accelerator=cpu",
                      config_name="evaluate")
    return run, cfg, [ckpt.parent]


def _predict_into(output: str):
    """predict of a good input folder into ``output`` (``{tmp}`` is the test's folder); the checkpoint is never read."""

    def call(tmp: Path):
        from brpg_lightning.predict import run

        inp = tmp / "photos"
        inp.mkdir()
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(inp / "a.png")
        (tmp / "afile").write_text("a file, not a folder\n")
        ckpt = tmp / "model.ckpt"
        ckpt.write_bytes(b"never read: the output is checked first")
        cfg = compose_cfg(f"ckpt_path={ckpt}", f"input={inp}", f"output={output.format(tmp=tmp)}", "progress=false",
                          config_name="predict")
        return run, cfg, [inp, tmp / "afile", ckpt]

    return call


def _export_into(output: str):
    def call(tmp: Path):
        from brpg_lightning.export import run

        (tmp / "afile").write_text("a file, not a folder\n")
        ckpt = tmp / "model.ckpt"
        ckpt.write_bytes(b"never read: the output is checked first")
        cfg = compose_cfg(f"ckpt_path={ckpt}", "format=torchscript", f"output={output.format(tmp=tmp)}",
                          config_name="export")
        return run, cfg, [tmp / "afile", ckpt]

    return call


def _evaluate_over_a_report(tmp: Path):
    from brpg_lightning.evaluate import run

    ckpt = tmp / "ckpts" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"never read: the earlier report is checked first")
    (ckpt.parent / "last.eval.json").write_text('{"mIoU": 0.61}')
    cfg = compose_cfg(f"ckpt_path={ckpt}", "trainer.accelerator=cpu", config_name="evaluate")
    return run, cfg, [ckpt.parent]


def _evaluate_on_fewer_classes(tmp: Path):
    """A 7-class checkpoint (its run config only: the count is refused before any weight is read) evaluated on a
    folder dataset of 4 classes."""
    import torch
    from omegaconf import OmegaConf

    from brpg_lightning.evaluate import run

    stored = compose_cfg(*FOLDER_RUN, "dataset.num_classes=7", f"dataset.root={tmp / 'old'}", output_dir=tmp / "r")
    ckpt = tmp / "ckpts" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"hyper_parameters": {"run_config": OmegaConf.to_container(stored, resolve=True)}, "state_dict": {}},
               ckpt)
    data = folder_data(tmp / "data", [np.minimum(m, 3) for m in binary(3)])
    cfg = compose_cfg(f"ckpt_path={ckpt}", "dataset=folder", f"dataset.root={data}", "trainer.accelerator=cpu",
                      f"output={tmp / 'reports'}", config_name="evaluate")
    return run, cfg, [ckpt.parent, data]


def _split_lists(labeled: list[str], val: list[str]):
    """Split lists over a folder dataset (``<data>/splits/1/{labeled,unlabeled}.txt``, ``<data>/splits/val.txt``)."""

    def call(tmp: Path):
        from brpg_lightning.data.datasets.layout import FolderSplitLayout
        from brpg_lightning.data.splits import load_split

        data = folder_data(tmp / "data", binary(1))
        (data / "splits" / "1").mkdir(parents=True)
        (data / "splits" / "1" / "labeled.txt").write_text("".join(f"labeled/images/{n}.png\n" for n in labeled))
        (data / "splits" / "1" / "unlabeled.txt").write_text("unlabeled/images/u0.png\nunlabeled/images/u1.png\n")
        (data / "splits" / "val.txt").write_text("".join(f"{n}\n" for n in val))
        return (lambda split_dir: load_split(FolderSplitLayout(data), split_dir, "1")), data / "splits", [data]

    return call


def _set(cfg, key: str, value):
    from omegaconf import OmegaConf

    OmegaConf.update(cfg, key, value)
    return cfg


def _unset(config_name: str, *overrides: str):
    def call(tmp: Path):
        import importlib

        module = importlib.import_module({"train": "brpg_lightning.train"}.get(config_name, f"brpg_lightning.{config_name}"))
        return module.run, compose_cfg(*overrides, output_dir=tmp / "run", config_name=config_name), []

    return call


def _make_split(*args: str, existing_val: bool = False):
    def call(tmp: Path):
        from brpg_lightning.tools.make_split import main

        data = folder_data(tmp / "data", binary(1) * 2)
        out = tmp / "splits"
        if existing_val:
            out.mkdir()
            (out / "val.txt").write_text("someone else's val list\n")
        argv = ["dataset=folder", f"dataset.root={data}", "labeled=2", f"out={out}", *args]
        return main, argv, [data, out]

    return call


def _without_gpu(fn: Callable) -> Callable:
    """``fn`` run where torch sees no CUDA GPU (also on a machine that has one)."""
    from unittest import mock

    def call(*args, **kwargs):
        with mock.patch("torch.cuda.is_available", return_value=False):
            return fn(*args, **kwargs)

    return call


def _value(config_name: str, *overrides: str, gpu: bool = True):
    """A composition that is fine but for ``overrides``; ``gpu=False``: as on a machine without a GPU."""

    def call(tmp: Path):
        fn, cfg, keep = _unset(config_name, *overrides)(tmp)
        return (fn if gpu else _without_gpu(fn)), cfg, keep

    return call


VALUE_CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "brpg.eta_s=1.5": (("brpg.eta_s=1.5",), ("brpg.eta_s=1.5", "a number in (0, 1)")),
    "brpg.eta_s=0": (("brpg.eta_s=0",), ("brpg.eta_s=0", "a number in (0, 1)")),
    "brpg.lambda_pro=-1": (("brpg.lambda_pro=-1",), ("brpg.lambda_pro=-1", "a number >= 0")),
    "brpg.tau=0": (("brpg.tau=0",), ("brpg.tau=0", "a number > 0")),
    "brpg.V=0": (("brpg.V=0",), ("brpg.V=0", "an integer >= 1")),
    "brpg.n0_h=0": (("brpg.n0_h=0",), ("brpg.n0_h=0", "an integer >= 1")),
    "T_S1 at max_epochs": (("T_S1=3", "T_S2=4", "sup_only_epochs=0", "trainer.max_epochs=3"),
                           ("brpg.T_S1=3", "trainer.max_epochs=3", "BRPG would never run", "T_S1 < max_epochs")),
    "T_S1 beyond max_epochs": (("T_S1=5", "T_S2=6", "sup_only_epochs=0", "trainer.max_epochs=3"),
                               ("brpg.T_S1=5", "trainer.max_epochs=3")),
    "optim.optimizer.lr=0": (("optim.optimizer.lr=0",), ("optim.optimizer.lr=0", "a number > 0")),
    "optim.optimizer.lr<0": (("optim.optimizer.lr=-0.01",), ("optim.optimizer.lr=-0.01", "a number > 0")),
    "method.ema_decay=1.5": (("method.ema_decay=1.5",), ("method.ema_decay=1.5", "a number in [0, 1]")),
    "seed=abc": (("seed=abc",), ("seed='abc'", "an integer >= 0")),
    "dataset.num_classes=abc": (("dataset.num_classes=abc",), ("dataset.num_classes='abc'", "an integer >= 2")),
    "dataset.max_image_pixels=0": (("dataset.max_image_pixels=0",), ("dataset.max_image_pixels=0", "an integer >= 1")),
    "trainer.precision=fp8": (("trainer.precision=fp8",), ("trainer.precision='fp8'", "16-mixed", "bf16-mixed")),
}
"""Values out of range, each refused at start-up by ``brpg_lightning.validate``: overrides -> names."""


CASES: dict[str, Case] = {
    "train into a finished run": Case(_train_into_finished_run, ("runs/89", "overwrite=true", "ckpt_path=")),
    "train into a finished run, resuming another": Case(_train_from_another_runs_checkpoint, ("runs/89",)),
    "binary masks saved as 0/255": Case(_train_data(binary(255), 2), ("labeled/masks", "only 0 and 255",
                                                                     "0/255 masks: save foreground as 1")),
    "masks only 255": Case(_train_data(binary(255, None), 2), ("labeled/masks", "only 255 (ignore)",
                                                              "0/255 masks: save foreground as 1")),
    "a class never occurs": Case(_train_data(binary(1), 3), ("class 2 ('class_2') never occurs", "labeled/masks",
                                                            "dataset.num_classes=3")),
    "a zero-byte labeled image outside the sample": Case(
        _train_bad_file("labeled/images/l3.png", b""), ("labeled/images/l3.png", "empty file (0 bytes)")),
    "a text file named .png among the unlabeled images": Case(
        _train_bad_file("unlabeled/images/u3.png", b"not an image\n"),
        ("unlabeled/images/u3.png", "not an image file", "expected an image file")),
    "a val mask of another size": Case(
        _train_bad_file("val/masks/v1.png", png_bytes(np.zeros((8, 8), np.uint8))),
        ("val/masks/v1.png", "8x8", "16x16", "expected the same size")),
    "a 14000 x 14000 unlabeled image (PIL's decompression-bomb limit)": Case(
        _train_bad_file("unlabeled/images/u3.png", png_claiming(14000, 14000)),
        ("unlabeled/images/u3.png", "14000x14000 = 196000000 pixels", "dataset.max_image_pixels=89478485",
         "raise dataset.max_image_pixels")),
    "16 x 16 images above a lowered dataset.max_image_pixels": Case(
        _train_data(binary(1), 2, 4, "dataset.max_image_pixels=200"),
        ("images/", "16x16 = 256 pixels", "above dataset.max_image_pixels=200")),
    "classes file with a line too many": Case(
        _train_with_file("dataset.classes_file", lambda p: p.write_text("background\ncat\ndog\n")),
        ("dataset.classes_file", "given/file", "3 class lines", "num_classes=2")),
    "a text file as model.weights_path": Case(
        _train_with_file("model.weights_path", lambda p: p.write_text("these are not weights\n")),
        ("model.weights_path=", "given/file", "not a safetensors file or a torch.save'd state dict")),
    "pickled objects as model.weights_path": Case(
        _train_with_file("model.weights_path", _pickled_object),
        ("model.weights_path=", "Python objects besides tensors", "torch.save(model.state_dict(), path)")),
    "train: ckpt_path a text file": Case(
        _train_with_file("ckpt_path", lambda p: p.write_text("not a checkpoint\n")),
        ("ckpt_path=", "given/file", "not a readable PyTorch checkpoint")),
    "train: ckpt_path truncated": Case(
        _train_with_file("ckpt_path", _truncated_checkpoint), ("ckpt_path=", "given/file", "truncated or corrupt")),
    "train: ckpt_path of another class count": Case(
        _train_with_file("ckpt_path", _checkpoint_of("dataset.num_classes=5")),
        ("dataset.num_classes=2", "checkpoint's model has 5 classes", "given/file", "resume it on its own dataset")),
    "train: ckpt_path of another model": Case(
        _train_with_file("ckpt_path", _checkpoint_of("model.decoder_channels=32")),
        ("ckpt_path=", "given/file", "weights do not fit the model this run builds", "of another shape")),
    "train: ckpt_path of another method": Case(
        _train_with_file("ckpt_path", _checkpoint_of("method=fixmatch")),
        ("ckpt_path=", "given/file", "a checkpoint of method=fixmatch", "method=mean_teacher")),
    "no unlabeled images, mean teacher + BRPG": Case(
        _train_data(binary(1), 2, 0), ("no unlabeled images for a semi-supervised method (method=mean_teacher)",
                                       "unlabeled/images")),
    "no unlabeled images, FixMatch": Case(_train_data(binary(1), 2, 0, "method=fixmatch"), ("(method=fixmatch)",)),
    "predict: stems collide": Case(_predict_colliding_stems, ("'a.jpg', 'a.png' -> 'a.png'", "photos")),
    "evaluate: report folder not writable": Case(_evaluate_into_unwritable_folder,
                                                 ("output=/proc/self/brpg-reports", "cannot write there",
                                                  "output=<a writable folder>", "report=false")),
    "predict: output in /proc": Case(_predict_into("/proc/self/brpg-masks"),
                                     ("output=/proc/self/brpg-masks", "cannot write there", "a writable folder")),
    "predict: output under a file": Case(_predict_into("{tmp}/afile/masks"),
                                         ("afile/masks", "Not a directory", "a writable folder")),
    "export: output in /proc": Case(_export_into("/proc/self/model.pt"),
                                    ("output=/proc/self/model.pt", "cannot write into /proc/self", "a writable path")),
    "export: output under a file": Case(_export_into("{tmp}/afile/model.pt"),
                                        ("output=", "afile/model.pt", "exists and is not a folder", "a writable path")),
    "evaluate: an earlier report": Case(_evaluate_over_a_report, ("last.eval.json", "already exists",
                                                                  "overwrite=true")),
    "evaluate: 7-class checkpoint, dataset of unstated classes": Case(
        _evaluate_on_fewer_classes, ("dataset.num_classes is not set", "7 classes", "dataset.num_classes=7")),
    "evaluate: 7-class checkpoint, 4-class dataset": Case(
        lambda tmp: (lambda fn, cfg, keep: (fn, _set(cfg, "dataset.num_classes", 4), keep))(
            *_evaluate_on_fewer_classes(tmp)), ("dataset.num_classes=4", "7 classes")),
    "split: val shares images with labeled": Case(
        _split_lists(["l0", "l1"], ["val/images/v0.png", "labeled/images/l1.png"]),
        ("splits/val.txt", "labeled", "labeled/images/l1.png", "not trained on")),
    "split: a line twice": Case(_split_lists(["l0", "l1", "l0"], ["val/images/v0.png"]),
                                ("labeled.txt", "'labeled/images/l0.png' twice", "lines 1 and 3")),
    "train: dataset.num_classes unset": Case(_unset("train", "dataset=folder"),
                                             ("dataset.num_classes is not set", "dataset.num_classes=5")),
    "evaluate: ckpt_path unset": Case(_unset("evaluate"), ("ckpt_path is not set", "ckpt_path=outputs/")),
    "predict: ckpt_path unset": Case(_unset("predict", "input=x", "output=y"), ("ckpt_path is not set",)),
    "export: ckpt_path unset": Case(_unset("export"), ("ckpt_path is not set",)),
    "make_split: seed=-1": Case(_make_split("seed=-1"), ("seed=-1", "integer >= 0")),
    "make_split: seed=abc": Case(_make_split("seed=abc"), ("seed='abc'", "integer >= 0")),
    "make_split: another val.txt": Case(_make_split("seed=0", existing_val=True), ("val.txt", "never overwritten")),
    **{f"train: {name}": Case(_value("train", *overrides), names) for name, (overrides, names) in VALUE_CASES.items()},
    "train: trainer=gpu without a GPU": Case(_value("train", "trainer=gpu", gpu=False),
                                             ("trainer.accelerator='gpu'", "no CUDA GPU", "expected cpu or auto")),
    "predict: device=cuda without a GPU": Case(_value("predict", "ckpt_path=m.ckpt", "input=x", "output=y",
                                                      "device=cuda", gpu=False),
                                               ("device='cuda'", "no CUDA GPU", "expected cpu or auto")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mistake_is_one_line_before_the_work(name: str, tmp_path: Path, capsys) -> None:
    case = CASES[name]
    fn, arg, keep = case.call(tmp_path)
    before = tree_hashes(*keep)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        exit_on_bad_input(fn)(arg)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert all(s in lines[0] for s in case.names), lines[0]
    assert "Traceback" not in err
    assert "weights_only=False" not in err  # never advise unpickling arbitrary code
    assert tree_hashes(*keep) == before  # nothing the user made was written over, nothing half-written
    if name.startswith("make_split"):
        assert not list((tmp_path / "splits").rglob("labeled.txt"))


def test_run_directory_rules(tmp_path: Path, monkeypatch) -> None:
    """Allowed: a fresh or empty directory, Hydra's own files alone, resuming in place, overwrite=true, and every
    DDP rank Lightning re-launches into rank 0's directory."""
    from brpg_lightning.errors import BRPGInputError
    from brpg_lightning.run_dir import LAUNCH_RANK_VARIABLES, check_run_dir

    for name in LAUNCH_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    check_run_dir(tmp_path / "new")
    (tmp_path / "hydra_only" / ".hydra").mkdir(parents=True)
    (tmp_path / "hydra_only" / "checkpoints").mkdir()  # empty: nothing to lose
    check_run_dir(tmp_path / "hydra_only")
    run = finished_run(tmp_path / "run")
    check_run_dir(run, ckpt_path=run / "checkpoints" / "last.ckpt")
    check_run_dir(run, overwrite=True)
    with pytest.raises(BRPGInputError, match="metrics.json"):
        check_run_dir(run)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank Lightning's launcher re-ran
    check_run_dir(run)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # rank 0 of the second node
    check_run_dir(run)


def test_missing_classes_warn_and_sampled_census_only_warn() -> None:
    from brpg_lightning.data.datamodule import check_labeled_classes

    counts = np.bincount([0, 1, 255], minlength=256)
    names = ["background", "cat", "dog"]
    assert "'dog'" in check_labeled_classes(counts, 3, 3, names, "l", "warn")
    assert "2 sampled of the 9" in check_labeled_classes(counts, 2, 9, names, "l", "error")  # a sample: warn only


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_cli_refuses_a_finished_run_directory_before_hydra_writes(tmp_path: Path) -> None:
    """``hydra.run.dir=runs/89`` holding a finished run: refused before Hydra replaces its ``.hydra/``."""
    run = finished_run(tmp_path / "runs" / "89")
    before = tree_hashes(run)
    proc = _cli("brpg_lightning", "hydra.run.dir=runs/89", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "runs/89" in line and "overwrite=true" in line and "Traceback" not in proc.stderr
    assert tree_hashes(run) == before


def test_cli_unset_mandatory_key_is_one_line(tmp_path: Path) -> None:
    """Hydra composes ``???`` without complaint; the entry point names the key before OmegaConf's traceback."""
    proc = _cli("brpg_lightning.evaluate", f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "ckpt_path is not set" in line and "Traceback" not in proc.stderr


def test_writable_folder_check_leaves_nothing_behind(tmp_path: Path) -> None:
    """The check writes for real, then removes the folders and the file it made: a later refusal leaves no trace."""
    from brpg_lightning.run_dir import check_writable_folder

    check_writable_folder(tmp_path / "a" / "b")
    (tmp_path / "kept").mkdir()
    check_writable_folder(tmp_path / "kept")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]


def test_image_size_limits_of_both_decoders(tmp_path: Path, monkeypatch) -> None:
    """PIL's limit is ``dataset.max_image_pixels`` (raising it lets the file through); OpenCV's is its own,
    ``OPENCV_IO_MAX_IMAGE_PIXELS``, fixed per process: a real OpenCV run under a lowered limit names it."""
    from brpg_lightning.data.datasets import common

    monkeypatch.setattr(common.Image, "MAX_IMAGE_PIXELS", common.Image.MAX_IMAGE_PIXELS)
    monkeypatch.setenv(common.MAX_PIXELS_VARIABLE, "restored by monkeypatch")
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_claiming(14000, 14000))
    common.set_max_image_pixels(14000 * 14000)
    assert common.header_size(huge, "image") == (14000, 14000)
    assert common.Image.MAX_IMAGE_PIXELS == 196_000_000
    common.set_max_image_pixels(None)
    assert common.header_size(huge, "mask") == (14000, 14000)
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes(np.zeros((16, 16, 3), np.uint8)))
    code = ("import sys; from brpg_lightning.data.datasets.common import read_image\n"
            "try:\n    read_image(sys.argv[1])\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n")
    env = {**ENV, "OPENCV_IO_MAX_IMAGE_PIXELS": "100"}
    proc = subprocess.run([sys.executable, "-c", code, str(small)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("DataItemError"), proc.stdout + proc.stderr
    assert "16x16 = 256 pixels, above OpenCV's limit of 100" in proc.stdout and "OPENCV_IO_MAX_IMAGE_PIXELS" in proc.stdout
    monkeypatch.setattr(common, "OPENCV_MAX_PIXELS", 100)  # the header check names the same limit before any decoding
    with pytest.raises(common.DataItemError, match="above OpenCV's limit of 100"):
        common.header_size(small, "image")
    assert common.header_size(small, "mask") == (16, 16)  # masks are PIL's: OpenCV's limit does not apply


def test_multirun_runs_every_job_and_lists_the_failed_ones(tmp_path: Path) -> None:
    """A 2-job multirun whose first job has a bad value: the second still trains (its ``metrics.json``), the
    first is listed at the end with its one line, and the exit status is 2 (every failure was bad input)."""
    from tests.conftest import TINY

    sweep = tmp_path / "sweep"
    args = [*TINY, "brpg=none", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", f"dataset.root={tmp_path / 'data'}", "seed=abc,0",
            f"hydra.sweep.dir={sweep}"]
    proc = _cli("brpg_lightning", "-m", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (sweep / "1" / "metrics.json").is_file() and not (sweep / "0" / "metrics.json").exists()
    assert "Traceback" not in proc.stderr
    tail = proc.stderr[proc.stderr.index("multirun: 1 of 2 jobs failed"):].splitlines()
    assert len(tail) == 2 and tail[1].startswith(f"  job 0 (seed=abc; {sweep / '0'}): error: seed='abc'"), tail
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
        "error: seed='abc': expected an integer >= 0"]
