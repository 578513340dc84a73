"""The checkpoint's evaluation protocol is what ``evaluate`` and ``predict`` run: a stored stride that differs
from the default (2/3 of the crop) moves the sliding windows to ``models.inference.window_starts`` of that stride."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import brpg_lightning.models.inference as inference
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import EvalProtocol, default_stride, window_starts
from tests.conftest import TINY, compose_cfg

SIZE, CROP, STRIDE = 64, 48, 10  # the tiny synthetic images are 64 px: windows at [0, 10, 16], not [0, 16]


@pytest.fixture(scope="module")
def stride_ckpt(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> dict[str, Any]:
    """An untrained tiny checkpoint of a sliding-window run whose run config leaves the stride null (2/3 of the
    crop) while its ``inference`` block stores ``STRIDE``; and the same checkpoint in the older format (no
    ``eval_protocol``: derived from the run config). Returns ``{"new", "old"}`` paths."""
    from brpg_lightning.train import build_module

    folder = tmp_path_factory.mktemp("stride_ckpt")
    cfg = compose_cfg(*TINY, f"dataset.root={synthetic_root}", "dataset.val_mode=sliding",
                      f"dataset.val_crop_size={CROP}", "brpg=none", output_dir=folder / "run")
    module = build_module(cfg, class_names=None)
    assert module.eval_protocol == EvalProtocol("sliding", CROP, None)
    ckpt: dict[str, Any] = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    assert ckpt["inference"]["eval_protocol"] == {"mode": "sliding", "crop_size": CROP, "stride": None}
    ckpt["inference"]["eval_protocol"]["stride"] = STRIDE  # as a module built with that protocol stores it
    torch.save(ckpt, folder / "new.ckpt")
    del ckpt["inference"]["eval_protocol"]
    torch.save(ckpt, folder / "old.ckpt")
    return {"new": folder / "new.ckpt", "old": folder / "old.ckpt"}


@pytest.fixture
def window_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Every ``(length, crop, stride)`` that ``sliding_window_logits`` asks ``window_starts`` for."""
    calls: list[tuple[int, int, int]] = []

    def spy(length: int, crop: int, stride: int) -> list[int]:
        calls.append((length, crop, stride))
        return window_starts(length, crop, stride)

    monkeypatch.setattr(inference, "window_starts", spy)
    return calls


def test_stored_stride_moves_the_windows() -> None:
    assert default_stride(CROP) == 32
    assert window_starts(SIZE, CROP, STRIDE) == [0, 10, 16] != window_starts(SIZE, CROP, default_stride(CROP))


@pytest.mark.parametrize(("which", "overrides", "stride"), [
    ("new", (), STRIDE),  # the stored stride, not the run config's null
    ("old", (), default_stride(CROP)),  # older checkpoint: the run config's protocol, as before
    ("new", ("dataset.val_stride=20",), 20),  # the command line replaces the stored field
])
def test_evaluate_runs_the_stored_protocol(stride_ckpt, window_calls, capsys, which, overrides, stride) -> None:
    from brpg_lightning.evaluate import evaluate

    cfg = compose_cfg(f"ckpt_path={stride_ckpt[which]}", "trainer.accelerator=cpu", *overrides,
                      config_name="evaluate")
    results = evaluate(cfg)
    assert 0.0 <= results["val/mIoU"] <= 1.0 and results["_dataset"]["val_mode"] == "sliding"
    assert window_calls and set(window_calls) == {(SIZE, CROP, stride)}
    assert f"sliding window {CROP}x{CROP}, stride {stride}" in capsys.readouterr().out


def test_evaluate_override_that_breaks_the_protocol_is_one_line(stride_ckpt) -> None:
    from brpg_lightning.evaluate import evaluate

    cfg = compose_cfg(f"ckpt_path={stride_ckpt['new']}", "dataset.val_mode=tiles", config_name="evaluate")
    with pytest.raises(BRPGInputError, match="dataset.val_mode='tiles'"):
        evaluate(cfg)


@pytest.mark.parametrize(("which", "overrides", "window", "stride"), [
    ("new", (), CROP, STRIDE),  # the stored window and stride
    ("old", (), CROP, default_stride(CROP)),
    ("new", ("window_stride=20",), CROP, 20),
    ("new", ("window_size=40",), 40, default_stride(40)),  # another window: 2/3 of itself, not the stored stride
])
def test_predict_runs_the_stored_sliding_window(stride_ckpt, window_calls, tmp_path, which, overrides, window,
                                               stride) -> None:
    from brpg_lightning.predict import predict

    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(tmp_path / "in" / "x.png")
    cfg = compose_cfg(f"ckpt_path={stride_ckpt[which]}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                      "progress=false", *overrides, config_name="predict")
    assert len(predict(cfg)["written"]) == 1
    assert set(window_calls) == {(SIZE, window, stride)}


def test_predict_window_plan() -> None:
    from brpg_lightning.predict import DEFAULT_WINDOW, window_plan

    sliding = {"eval_protocol": EvalProtocol("sliding", 769, 300).as_dict()}
    assert window_plan(sliding, None) == (769, 300)
    assert window_plan({"eval_protocol": EvalProtocol("sliding", 769).as_dict()}, None) == (769, None)
    assert window_plan(sliding, 512) == (512, None) and window_plan(sliding, None, 100) == (769, 100)
    assert window_plan({"eval_protocol": EvalProtocol("center_crop", 513).as_dict()}, None) == (DEFAULT_WINDOW, None)
    for size, stride, key in ((0, None, "window_size"), (None, 0, "window_stride")):
        with pytest.raises(BRPGInputError, match=f"{key}=0"):
            window_plan(sliding, size, stride)
