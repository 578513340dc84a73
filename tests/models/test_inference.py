"""Sliding-window inference against whole-image inference and a brute-force coverage count."""

from __future__ import annotations

import pytest
import torch

from brpg_lightning.models.inference import sliding_window_logits, window_starts


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
