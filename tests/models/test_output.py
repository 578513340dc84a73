"""SegmentorOutput's geometry and resize_to_input in both geometries, against F.interpolate and by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from brpg_lightning.models.output import SegmentorOutput, resize_to_input
from brpg_lightning.models.segmentor import Segmentor


@pytest.mark.parametrize(("height", "width"), [(513, 513), (769, 769), (513, 769), (50, 77), (64, 64)])
def test_resize_to_input_both_geometries_against_interpolate(height: int, width: int) -> None:
    gen = torch.Generator().manual_seed(height + width)
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    x = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64)
    official = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)
    assert torch.equal(resize_to_input(x, (height, width), 4, align_corners=True), official)
    by_stride = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)[..., :height, :width]
    assert torch.equal(resize_to_input(x, (height, width), 4), by_stride)  # the function's default
    assert torch.equal(resize_to_input(x, (height, width), 4, align_corners=False), by_stride)
    assert not torch.allclose(official, by_stride)


def test_resize_to_input_by_hand_at_513() -> None:
    """A map that is its row index: ``align_corners=True`` at 513 from 129 rows reads row ``y / 4``; by the
    stride it reads ``(y + 0.5) / 4 - 0.5`` clamped to ``[0, 128]``."""
    x = torch.arange(129.0, dtype=torch.float64).view(1, 1, 129, 1).expand(1, 1, 129, 3)
    official = resize_to_input(x, (513, 9), 4, align_corners=True)[0, 0, :, 0]
    assert official[[0, 1, 2, 4, 6, 508, 512]].tolist() == [0.0, 0.25, 0.5, 1.0, 1.5, 127.0, 128.0]
    by_stride = resize_to_input(x, (513, 9), 4)[0, 0, :, 0]
    assert by_stride[[0, 1, 2, 4, 6, 512]].tolist() == [0.0, 0.0, 0.125, 0.625, 1.125, 127.625]


def test_resize_to_input_nearest_keeps_the_sizing_of_each_geometry() -> None:
    x = torch.arange(6.0).view(1, 1, 2, 3)
    assert torch.equal(resize_to_input(x, (7, 9), 4, mode="nearest", align_corners=True),
                       F.interpolate(x, size=(7, 9), mode="nearest"))
    assert torch.equal(resize_to_input(x, (7, 9), 4, mode="nearest"),
                       F.interpolate(x, scale_factor=4, mode="nearest")[..., :7, :9])
    with pytest.raises(ValueError, match="does not cover"):
        resize_to_input(x, (9, 9), 4)  # 2 rows x 4 < 9 rows


@pytest.mark.parametrize("align_corners", [True, False])
def test_output_carries_its_geometry_through_detach_split_and_upsampling(align_corners: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    logits, feats = torch.randn(3, 2, 5, 6, generator=gen), torch.randn(3, 4, 5, 6, generator=gen)
    out = SegmentorOutput(logits, lambda: feats, feats, 4, align_corners=align_corners)
    parts = [*out.split([1, 2]), out.detach()]
    assert all(p.align_corners is align_corners for p in parts)
    assert all(not p.features_computed for p in parts[:2])  # lazy features stay lazy
    expected = resize_to_input(logits, (18, 21), 4, align_corners=align_corners)
    assert torch.equal(out.logits_at((18, 21)), expected)
    assert torch.equal(out.upsample(logits * 2, (18, 21)), resize_to_input(logits * 2, (18, 21), 4,
                                                                           align_corners=align_corners))
    assert torch.equal(parts[1].logits_at((18, 21)), expected[1:])
    assert f"align_corners={align_corners}" in repr(out)


def test_segmentor_outputs_carry_its_geometry_official_by_default() -> None:
    small = {"encoder_name": "resnet18", "decoder_channels": 16, "feature_dim": 8, "encoder_depth": 4}
    torch.manual_seed(0)
    official = Segmentor(3, **small).eval()
    assert official.align_corners is True
    torch.manual_seed(0)
    by_stride = Segmentor(3, align_corners=False, **small).eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        a, b = official(x), by_stride(x)
    assert a.align_corners is True and b.align_corners is False
    assert torch.equal(a.logits, b.logits)  # same weights, same maps; only the reading differs
    assert torch.equal(a.logits_at((65, 65)), F.interpolate(a.logits, size=(65, 65), mode="bilinear",
                                                            align_corners=True))
    assert torch.equal(b.logits_at((65, 65)), F.interpolate(b.logits, scale_factor=4, mode="bilinear",
                                                            align_corners=False)[..., :65, :65])
