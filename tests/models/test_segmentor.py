"""Segmentor: shapes at any input size, padding/cropping geometry, heads, parameter groups."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from brpg_lightning.models.output import resize_to_input
from brpg_lightning.models.segmentor import Segmentor

C, D, DEC = 3, 16, 32
SMALL = {"encoder_name": "resnet18", "decoder_channels": DEC, "feature_dim": D}


@pytest.fixture(scope="module")
def model() -> Segmentor:
    torch.manual_seed(0)
    return Segmentor(C, **SMALL).eval()


def test_build_measures_stride_and_channels_and_restores_train_mode() -> None:
    seg = Segmentor(C, **SMALL)
    assert (seg.stride, seg.decoder_channels, seg.num_classes, seg.feature_dim) == (4, DEC, C, D)
    assert seg.pad_multiple == 16  # dilated ResNet, encoder_output_stride=16 (smp's check_input_shape)
    assert all(m.training for m in seg.modules())
    assert not hasattr(seg, "segmentation_head") and not hasattr(seg, "classification_head")


def test_defaults_never_download() -> None:
    assert inspect.signature(Segmentor).parameters["encoder_weights"].default is None


@pytest.mark.parametrize("size", [(64, 64), (321, 321), (513, 513), (769, 769), (50, 77)])
def test_output_shapes_any_input_size(model: Segmentor, size: tuple[int, int]) -> None:
    height, width = size
    with torch.no_grad():
        out = model(torch.randn(1, 3, height, width))
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    assert out.stride == 4
    assert out.logits.shape == (1, C, h, w)
    assert out.features.shape == (1, D, h, w)
    assert out.decoder.shape == (1, DEC, h, w)
    assert resize_to_input(out.logits, (height, width), out.stride).shape == (1, C, height, width)


def test_no_padding_needed_equals_direct_encoder_decoder_heads(model: Segmentor) -> None:
    x = torch.randn(2, 3, 64, 80)  # multiples of 16: no padding
    with torch.no_grad():
        out = model(x)
        dec = model.decoder(model.encoder(x))
        assert torch.equal(out.decoder, dec)
        assert torch.equal(out.logits, model.classifier(dec))
        assert torch.equal(out.features, model.feature_head(dec))


def test_padding_is_zeros_bottom_right_then_ceil_crop(model: Segmentor) -> None:
    x = torch.randn(1, 3, 50, 77)
    padded = F.pad(x, (0, 80 - 77, 0, 64 - 50))  # reference: zero-pad to multiples of 16 by hand
    with torch.no_grad():
        out = model(x)
        dec = model.decoder(model.encoder(padded))
        logits = model.classifier(dec)
    assert dec.shape[-2:] == (16, 20)
    assert torch.equal(out.logits, logits[..., :13, :20])  # ceil(50/4) = 13, ceil(77/4) = 20
    assert torch.equal(out.decoder, dec[..., :13, :20])


def test_segformer_mit_b0_linear_head() -> None:
    seg = Segmentor(
        C,
        arch="segformer",
        encoder_name="mit_b0",
        feature_dim=D,
        head="linear",
        decoder_segmentation_channels=DEC,
    ).eval()
    assert seg.stride == 4 and seg.decoder_channels == DEC
    with torch.no_grad():
        out = seg(torch.randn(1, 3, 64, 64))
        odd = seg(torch.randn(1, 3, 33, 47))
    assert out.logits.shape == (1, C, 16, 16) and out.features.shape == (1, D, 16, 16)
    assert odd.logits.shape == (1, C, 9, 12)
    # Linear-Dropout-Linear: two 1x1 convolutions, no batch norm
    convs = [m for m in seg.classifier.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (1, 1)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in seg.classifier.modules())


def test_conv_head_structure_and_head_channels() -> None:
    seg = Segmentor(C, head_channels=8, head_dropout=0.2, **SMALL)
    kinds = [type(m).__name__ for m in seg.feature_head]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout2d"] * 2 + ["Conv2d"]
    first, last = seg.feature_head[0], seg.feature_head[-1]
    assert (first.in_channels, first.out_channels, first.kernel_size, first.bias) == (DEC, 8, (3, 3), None)
    assert (last.in_channels, last.out_channels, last.kernel_size) == (8, D, (1, 1)) and last.bias is not None
    assert seg.classifier[-1].out_channels == C
    assert seg.feature_head[3].p == 0.2


def test_param_groups_partition_trainable_params_once() -> None:
    seg = Segmentor(C, **SMALL)
    groups = seg.param_groups()
    assert set(groups) == {"backbone", "head"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in seg.parameters() if p.requires_grad}
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in seg.encoder.parameters()}


def test_every_parameter_gets_a_gradient() -> None:
    """No unused parameters (DDP would complain): smp's own heads are gone."""
    seg = Segmentor(C, **SMALL).train()
    out = seg(torch.randn(2, 3, 32, 48))
    (out.logits.sum() + out.features.sum()).backward()
    assert all(p.grad is not None for p in seg.parameters())


def test_bad_config_values_raise() -> None:
    with pytest.raises(ValueError, match="'mlp'"):
        Segmentor(C, head="mlp", **SMALL)
    with pytest.raises(ValueError, match="pad_multiple=8"):
        Segmentor(C, pad_multiple=8, **SMALL)
    with pytest.raises(ValueError, match="'nope'"):
        Segmentor(C, arch="nope", **SMALL)
