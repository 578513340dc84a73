"""Sliding-window inference against whole-image inference and a brute-force coverage count; the evaluation
protocol value (validation, one line, the round trip config -> value -> checkpoint dict -> value)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from brpg_lightning.checkpoint import inference_metadata, stored_eval_protocol
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import EVAL_MODES, EvalProtocol, sliding_window_logits, window_starts


@pytest.mark.parametrize("size,crop,stride", [((23, 37), 8, 5), ((16, 16), 16, 10), ((9, 40), (12, 11), (4, 7))])
def test_sliding_window_equals_whole_image_for_a_position_only_model(size, crop, stride):
    height, width = size
    images = torch.zeros(2, 3, height, width)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    images[:, 0], images[:, 1] = yy.float(), xx.float()  # each pixel carries its own coordinates
    seen = torch.zeros(height, width)

    def logits_fn(window: torch.Tensor) -> torch.Tensor:
        y, x = window[:, 0], window[:, 1]
        seen[y[0].long(), x[0].long()] += 1
        return torch.stack([torch.sin(y) + x, y * x / 100.0, -y], dim=1)

    whole = logits_fn(images)
    seen.zero_()
    slid = sliding_window_logits(logits_fn, images, crop, stride)
    torch.testing.assert_close(slid, whole)
    assert bool((seen >= 1).all()), "every pixel must be covered by at least one window"


def test_overlaps_are_averaged():
    images = torch.zeros(1, 3, 1, 10)
    calls = []

    def logits_fn(window: torch.Tensor) -> torch.Tensor:
        calls.append(len(calls))
        return torch.full((1, 1, *window.shape[-2:]), float(len(calls)))  # 1 for the first window, 2, ...

    out = sliding_window_logits(logits_fn, images, crop=(1, 6), stride=(1, 4))
    # windows [0, 6) -> 1 and [4, 10) -> 2: columns 4 and 5 average to 1.5
    expected = torch.tensor([1, 1, 1, 1, 1.5, 1.5, 2, 2, 2, 2]).view(1, 1, 1, 10)
    torch.testing.assert_close(out, expected)


def test_default_stride_is_two_thirds_of_the_crop():
    assert window_starts(2048, 769, -(-2 * 769 // 3)) == [0, 513, 1026, 1279]
    seen = []

    def logits_fn(window: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(window.shape[-2:]))
        return window[:, :1]

    sliding_window_logits(logits_fn, torch.zeros(1, 3, 1024, 2048), crop=769)
    assert len(seen) == 2 * 4 and set(seen) == {(769, 769)}


# ----------------------------------------------------------------------------- the protocol value
@pytest.mark.parametrize(("mode", "crop", "stride", "fragment"), [
    ("tiles", None, None, "dataset.val_mode='tiles'; expected one of whole, center_crop, sliding"),
    (None, None, None, "dataset.val_mode=None"),
    ("sliding", None, None, "dataset.val_mode=sliding needs dataset.val_crop_size >= 1, got None"),
    ("center_crop", 0, None, "dataset.val_mode=center_crop needs dataset.val_crop_size >= 1, got 0"),
    ("sliding", 8, 0, "dataset.val_stride=0; expected an integer >= 1 or null"),
])
def test_protocol_validation_is_a_one_line_error(mode, crop, stride, fragment) -> None:
    with pytest.raises(BRPGInputError) as err:
        EvalProtocol(mode, crop, stride)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_protocol_value_is_frozen_plain_and_describes_itself() -> None:
    assert EVAL_MODES == ("whole", "center_crop", "sliding")
    p = EvalProtocol("sliding", "64", 20.0)  # YAML/JSON numbers become plain ints
    assert (p.crop_size, p.stride, p.window_stride) == (64, 20, 20) and p == EvalProtocol("sliding", 64, 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.stride = 5  # type: ignore[misc]
    assert EvalProtocol("sliding", 8).window_stride == 6 and EvalProtocol("center_crop", 8).window_stride is None
    assert EvalProtocol("sliding", 64, 20).describe() == (
        "sliding window 64x64, stride 20, over the whole image, overlapping logits averaged"
    )
    assert EvalProtocol("sliding", 8).describe().startswith("sliding window 8x8, stride 6 (2/3 of the crop)")
    assert EvalProtocol("center_crop", 513).describe() == "center crop 513x513 (single scale)"
    assert EvalProtocol().describe() == "whole image (single scale)"


@pytest.mark.parametrize("dataset", [
    {"val_mode": "sliding", "val_crop_size": 769, "val_stride": 300},
    {"val_mode": "sliding", "val_crop_size": 769, "val_stride": None},
    {"val_mode": "center_crop", "val_crop_size": 513, "val_stride": None},
    {"val_mode": "whole", "val_crop_size": None},
    {},
])
def test_protocol_round_trip_config_value_checkpoint_value(dataset) -> None:
    cfg = OmegaConf.create({"dataset": {"name": "d", **dataset}, "model": {"num_classes": 2}})
    protocol = EvalProtocol.from_dataset(cfg.dataset)
    assert protocol == EvalProtocol(dataset.get("val_mode", "whole"), dataset.get("val_crop_size"),
                                    dataset.get("val_stride"))
    run_config = OmegaConf.to_container(cfg, resolve=True)
    block = inference_metadata(run_config, ["a", "b"], "student.", eval_protocol=protocol)
    assert block["eval_protocol"] == {"mode": protocol.mode, "crop_size": protocol.crop_size, "stride": protocol.stride}
    assert type(block["eval_protocol"]) is dict  # a plain dict: checkpoints load with weights_only=True
    ckpt = {"inference": block, "hyper_parameters": {"run_config": run_config}}
    assert stored_eval_protocol(ckpt) == protocol == EvalProtocol.from_dict(block["eval_protocol"])
    # without a protocol of its own, the block takes the dataset config's
    assert inference_metadata(run_config, ["a", "b"], "student.")["eval_protocol"] == block["eval_protocol"]


def test_stored_protocol_is_the_modules_not_the_run_configs() -> None:
    run_config = {"dataset": {"val_mode": "sliding", "val_crop_size": 64, "val_stride": None}, "model": {}}
    block = inference_metadata(run_config, ["a"], "", eval_protocol=EvalProtocol("sliding", 64, 10))
    assert stored_eval_protocol({"inference": block, "hyper_parameters": {"run_config": run_config}}).stride == 10


@pytest.mark.parametrize(("run_dataset", "old_block", "expected"), [
    # what training wrote before the protocol was stored: the run config names it, the block repeats two keys
    ({"val_mode": "sliding", "val_crop_size": 769, "val_stride": 300},
     {"val_mode": "sliding", "val_crop_size": 769, "crop_size": 769}, EvalProtocol("sliding", 769, 300)),
    ({"val_mode": "center_crop", "val_crop_size": 513, "val_stride": None},
     {"val_mode": "center_crop", "val_crop_size": 513, "crop_size": 513}, EvalProtocol("center_crop", 513)),
    ({"val_mode": "whole", "val_crop_size": None}, {"val_mode": "whole", "val_crop_size": None, "crop_size": 64},
     EvalProtocol()),
    # a run config without the keys: the old block's; nothing at all: the whole image
    ({}, {"val_mode": "sliding", "val_crop_size": 769, "crop_size": 769}, EvalProtocol("sliding", 769)),
    ({}, {"val_mode": None, "val_crop_size": None, "crop_size": 64}, EvalProtocol()),
    ({}, None, EvalProtocol()),
])
def test_old_style_inference_block_loads_to_the_same_value(run_dataset, old_block, expected) -> None:
    old = {"version": 1, "class_names": ["a"], "model": {}, "eval_prefix": ""}
    if old_block is not None:
        old["protocol"] = old_block
    ckpt = {"inference": old, "hyper_parameters": {"run_config": {"dataset": run_dataset}}}
    assert stored_eval_protocol(ckpt) == expected
    if run_dataset:  # the value a new checkpoint of the same run stores
        new = inference_metadata({"dataset": run_dataset, "model": {}}, ["a"], "")
        assert EvalProtocol.from_dict(new["eval_protocol"]) == expected
