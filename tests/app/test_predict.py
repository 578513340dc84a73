"""``python -m brpg_lightning.predict``: sizes kept, palettes, batches, sliding window, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from brpg_lightning.checkpoint import CITYSCAPES_PALETTE, dataset_palette, load_checkpoint, voc_palette
from brpg_lightning.cli import exit_on_bad_input
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import sliding_window_logits
from tests.conftest import compose_cfg

# PASCAL VOC devkit colours of classes 0-6 (background, aeroplane, bicycle, bird, boat, bottle, bus).
VOC_FIRST_7 = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128]]
SIZES = {"a.png": (40, 56), "b.jpg": (40, 56), "c.png": (40, 56), "sub/d.png": (33, 70), "big.png": (90, 61)}
WINDOW = 64  # big.png (90 px tall) goes window by window


def predict_cfg(ckpt: Path, inp: Path, out: Path, *overrides: str):
    return compose_cfg(
        f"ckpt_path={ckpt}", f"input={inp}", f"output={out}", "progress=false", "batch_size=2",
        f"window_size={WINDOW}", *overrides, config_name="predict",
    )


def make_images(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (h, w) in SIZES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, quality=95)
        arrays[name] = np.asarray(Image.open(path).convert("RGB"))  # what was written (JPEG is lossy)
    return arrays


def reference_module(ckpt_path: Path):
    """The Lightning module rebuilt from the run config: its ``predict_logits`` is the validation path."""
    from brpg_lightning.train import build_module

    ckpt = load_checkpoint(ckpt_path)
    run_cfg = OmegaConf.create(ckpt["hyper_parameters"]["run_config"])
    module = build_module(run_cfg, class_names=ckpt["inference"]["class_names"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def normalised(arr: np.ndarray) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (torch.as_tensor(np.array(arr)).permute(2, 0, 1)[None].float() / 255.0 - mean) / std


@pytest.mark.slow
def test_predict_folder_keeps_sizes_palette_and_matches_validation_path(tiny_run, tmp_path: Path) -> None:
    from brpg_lightning.predict import predict

    arrays = make_images(tmp_path / "in")
    result = predict(predict_cfg(tiny_run["last"], tmp_path / "in", tmp_path / "out"))
    assert sorted(result["written"]) == sorted(str(tmp_path / "in" / n) for n in SIZES)
    module = reference_module(tiny_run["last"])
    for name, arr in arrays.items():
        stem = Path(name).with_suffix(".png")
        mask = np.asarray(Image.open(tmp_path / "out" / "masks" / stem))
        color = Image.open(tmp_path / "out" / "color" / stem)
        over = np.asarray(Image.open(tmp_path / "out" / "overlay" / stem))
        assert mask.shape == arr.shape[:2] and color.size == (arr.shape[1], arr.shape[0]) and over.shape == arr.shape
        assert color.mode == "P" and color.getpalette()[: 3 * 7] == sum(VOC_FIRST_7, [])
        np.testing.assert_array_equal(np.asarray(color), mask)
        expected_over = np.clip(0.5 * arr + 0.5 * np.asarray(VOC_FIRST_7)[mask] + 0.5, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(over, expected_over)
        x = normalised(arr)
        with torch.no_grad():
            if max(arr.shape[:2]) > WINDOW:
                logits = sliding_window_logits(lambda w: module.predict_logits(w, tuple(w.shape[-2:])), x, WINDOW)
            else:
                logits = module.predict_logits(x, tuple(x.shape[-2:]))
        top2 = logits[0].topk(2, dim=0).values
        decided = (top2[0] - top2[1]) > 1e-4  # ties within float noise may go either way
        np.testing.assert_array_equal(mask[decided.numpy()], logits[0].argmax(0).numpy()[decided.numpy()])
        assert decided.float().mean() > 0.95  # the comparison above covers nearly every pixel


@pytest.mark.slow
def test_cli_skips_unreadable_files_names_them_and_exits_nonzero(tiny_run, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(inp / "good.png")
    (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = inp / "half.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:60])  # truncated
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "brpg_lightning.predict", f"ckpt_path={tiny_run['last']}", f"input={inp}",
         f"output={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'h'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: skipped unreadable file")]
    assert len(warnings) == 2 and any("broken.png" in w for w in warnings) and any("half.png" in w for w in warnings)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0] and "half.png" in errors[0]
    assert (tmp_path / "out" / "masks" / "good.png").is_file()
    assert not (tmp_path / "out" / "masks" / "broken.png").exists()
    assert "predict: 100%" in proc.stderr  # the progress bar ran


def _exit_line(fn, cfg, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        exit_on_bad_input(fn)(cfg)
    assert exc.value.code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    return line


@pytest.mark.slow
def test_existing_outputs_are_kept_unless_overwrite(tiny_run, tmp_path: Path, capsys) -> None:
    from brpg_lightning.predict import run

    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(np.full((24, 24, 3), 10, np.uint8)).save(inp / "x.png")
    out = inp / "out"  # inside the input: its files must not be read as inputs
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "other.png").write_bytes(b"keep me")
    assert run(predict_cfg(tiny_run["last"], inp, out)) == 1  # added next to an unrelated file
    assert (out / "masks" / "other.png").read_bytes() == b"keep me" and (out / "masks" / "x.png").is_file()
    (out / "color" / "x.png").write_bytes(b"old")
    line = _exit_line(run, predict_cfg(tiny_run["last"], inp, out), capsys)
    assert str(out) in line and "color/x.png" in line and "overwrite=true" in line
    assert (out / "color" / "x.png").read_bytes() == b"old"
    assert run(predict_cfg(tiny_run["last"], inp, out, "overwrite=true")) == 1
    with Image.open(out / "color" / "x.png") as img:
        assert img.size == (24, 24)


@pytest.mark.slow
def test_input_folder_without_images_is_one_line(tiny_run, tmp_path: Path, capsys) -> None:
    from brpg_lightning.predict import run

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images here")
    line = _exit_line(run, predict_cfg(tiny_run["last"], tmp_path / "in", tmp_path / "out"), capsys)
    assert str(tmp_path / "in") in line and "no images" in line


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["no_block", "old_version", "missing_key"])
def test_checkpoint_without_usable_metadata_says_what_is_missing(tiny_run, tmp_path: Path, damage: str, capsys) -> None:
    from brpg_lightning.predict import run

    ckpt = torch.load(tiny_run["last"], map_location="cpu", weights_only=True)
    expected = {"no_block": "no 'inference' metadata", "old_version": "version 0", "missing_key": "lacks palette"}
    if damage == "no_block":
        del ckpt["inference"]
    elif damage == "old_version":
        ckpt["inference"]["version"] = 0
    else:
        del ckpt["inference"]["palette"]
    path = tmp_path / f"{damage}.ckpt"
    torch.save(ckpt, path)
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / "x.png")
    line = _exit_line(run, predict_cfg(path, tmp_path / "in", tmp_path / "out"), capsys)
    assert str(path) in line and expected[damage] in line
    assert not (tmp_path / "out").exists()


def test_voc_palette_is_the_devkit_rule() -> None:
    palette = voc_palette(21)
    assert palette[:7] == VOC_FIRST_7
    assert palette[15] == [192, 128, 128] and palette[20] == [0, 64, 128]  # person, tvmonitor
    assert len({tuple(c) for c in voc_palette(256)}) == 256  # distinct colours for any class count


def test_dataset_palette_choice() -> None:
    assert dataset_palette({"name": "cityscapes"}, 19)[0] == [128, 64, 128]
    assert dataset_palette({"name": "cityscapes"}, 19)[18] == list(CITYSCAPES_PALETTE[18]) == [119, 11, 32]
    assert dataset_palette({"name": "pascal"}, 21) == voc_palette(21)
    given = [[1, 2, 3], [4, 5, 6]]
    assert dataset_palette({"name": "folder", "palette": given}, 2) == given
    with pytest.raises(BRPGInputError, match="dataset.palette has 2 entries; expected 3"):
        dataset_palette({"palette": given}, 3)
