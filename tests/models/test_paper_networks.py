"""The paper's networks (Sec. 4.1.3): the real configs at full size (structure, no big forward) and the
same builders at reduced width/depth on 321, 513 and 769 inputs; multi-grid; the offline weight route."""

from __future__ import annotations

import copy
import math

import huggingface_hub.constants as hf_constants
import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from brpg_lightning.config import config_dir
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.segmentor import Segmentor, apply_multi_grid

C, D = 3, 8


def paper_model(name: str) -> Segmentor:
    """``conf/model/<name>.yaml`` as a run builds it, offline (``encoder_weights=null``)."""
    cfg = OmegaConf.load(config_dir() / "model" / f"{name}.yaml")
    cfg.num_classes, cfg.encoder_weights = 21, None
    return instantiate(cfg)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _reference_u2pl_dilations(blocks: tuple[int, ...], dilate: tuple[bool, bool, bool], multi_grid: bool) -> list[list[int]]:
    """3x3 dilations of layer2..layer4 by U2PL's ``ResNet._make_layer`` (u2pl/models/resnet.py), re-typed."""
    dilation, out = 1, []
    for stage, (n, dil) in enumerate(zip(blocks[1:], dilate, strict=True)):
        previous = dilation
        if dil:
            dilation *= 2
        grids = [2, 2, 4] if multi_grid and stage == 2 else [1] * n
        out.append([previous * grids[0]] + [dilation * grids[i] for i in range(1, n)])
    return out


# ---------------------------------------------------------------- full-size paper configs (slow: builds)
@pytest.mark.slow
def test_deeplabv3plus_is_u2pl_resnet101_at_output_stride_8() -> None:
    resnet101 = paper_model("deeplabv3plus").eval()
    enc = resnet101.encoder.model
    stem = [m for m in enc.conv1 if isinstance(m, nn.Conv2d)]  # U2PL deep stem: 3x3 convs 3 -> 64 -> 64 -> 128
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in stem] == [
        (3, 64, (3, 3), (2, 2)), (64, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))
    ]
    assert [len(getattr(enc, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    got = [[b.conv2.dilation[0] for b in getattr(enc, f"layer{i}")] for i in (2, 3, 4)]
    assert got == _reference_u2pl_dilations((3, 4, 23, 3), (False, True, True), multi_grid=True)
    assert resnet101.multi_grid_dilations == [4, 8, 16]
    assert all(b.conv2.padding == b.conv2.dilation for b in enc.layer4)  # sizes kept
    # same parameters as timm's ImageNet classifier without its fc: the pretrained weights fit as they are
    assert n_params(resnet101.encoder) == n_params(timm.create_model("resnet101s", num_classes=0))
    aspp = resnet101.decoder.aspp[0]
    rates = [m.dilation[0] for m in aspp.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert rates == [12, 24, 36]
    assert (resnet101.stride, resnet101.pad_multiple, resnet101.feature_dim) == (4, 8, 256)
    assert resnet101.feature_head[-1].out_channels == 256 and resnet101.classifier[-1].out_channels == 21
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        feats = resnet101.encoder(torch.nn.functional.pad(x, (0, 7, 0, 7)))
        out = resnet101(x)
    assert feats[-1].shape[-2:] == (72 // 8, 104 // 8) and feats[-1].shape[1] == 2048
    assert out.logits.shape == (1, 21, 17, 25) and out.features.shape == (1, 256, 17, 25)


@pytest.mark.slow
def test_xception65_and_segformer_b4_configs() -> None:
    xc = paper_model("deeplabv3plus_xception65")
    assert n_params(xc.encoder) == n_params(timm.create_model("xception65", num_classes=0))
    assert (xc.stride, xc.pad_multiple, xc.encoder.output_stride) == (4, 8, 8)
    blocks = [m for m in xc.encoder.modules() if type(m).__name__ == "XceptionModule"]
    assert len(blocks) == 3 + 16 + 2  # entry, middle and exit flow of Xception-65
    seg = paper_model("segformer")
    assert round(n_params(seg.encoder) / 1e6, 1) == 60.8  # MiT-B4 encoder, SegFormer paper Table 1
    assert seg.decoder_channels == 768 and seg.stride == 4
    convs = [m for m in seg.feature_head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(768, 256, (1, 1)), (256, 256, (1, 1))]
    assert any(isinstance(m, nn.Dropout2d) for m in seg.feature_head)


# ---------------------------------------------------------------- reduced builders at the paper's crops
REDUCED = {
    # tu-resnet101s with 1/8 width and depth [1, 1, 1, 3]: same deep stem, output stride 8, multi-grid
    "resnet101s": dict(
        encoder_name="tu-resnet101s", encoder_output_stride=8, multi_grid=[2, 2, 4], layers=[1, 1, 1, 3],
        channels=[8, 16, 32, 64], stem_width=8, decoder_channels=16, decoder_aspp_separable=False,
    ),
    # tu-xception65's entry / middle / exit flow with one middle block, narrow
    "xception65": dict(
        encoder_name="tu-xception65", encoder_output_stride=8, decoder_channels=16,
        block_cfg=[
            dict(in_chs=64, out_chs=16, stride=2), dict(in_chs=16, out_chs=32, stride=2),
            dict(in_chs=32, out_chs=48, stride=2), dict(in_chs=48, out_chs=48, stride=1),
            dict(in_chs=48, out_chs=(48, 64, 64), stride=2),
            dict(in_chs=64, out_chs=(96, 96, 128), stride=1, no_skip=True, start_with_relu=False),
        ],
    ),
    # the Mix Transformer family's smallest member (B4 differs in depth and width only)
    "mit": dict(arch="segformer", encoder_name="mit_b0", head="linear", decoder_segmentation_channels=16),
}


def reduced_kwargs(name: str) -> dict:
    """A fresh copy (timm writes into ``block_cfg`` dicts)."""
    return copy.deepcopy(REDUCED[name])


@pytest.fixture(scope="module", params=list(REDUCED))
def reduced(request: pytest.FixtureRequest) -> tuple[str, Segmentor]:
    torch.manual_seed(0)
    return request.param, Segmentor(C, feature_dim=D, head_channels=16, **reduced_kwargs(request.param)).eval()


@pytest.mark.parametrize("size", [321, 513, 769])
def test_reduced_networks_at_paper_crops(reduced: tuple[str, Segmentor], size: int) -> None:
    name, model = reduced
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
        if name != "mit":  # dilated encoders: the deepest map stays at 1/8 of the padded input
            padded = math.ceil(size / model.pad_multiple) * model.pad_multiple
            deepest = model.encoder(torch.zeros(1, 3, padded, padded))[-1]
            assert deepest.shape[-1] == padded // 8
    side = math.ceil(size / 4)
    assert out.stride == 4
    assert out.logits.shape == (1, C, side, side) and out.features.shape == (1, D, side, side)


def test_reduced_networks_train_every_parameter() -> None:
    model = Segmentor(C, feature_dim=D, head_channels=16, **reduced_kwargs("resnet101s")).train()
    out = model(torch.randn(2, 3, 64, 64))
    (out.logits.sum() + out.features.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_multi_grid_errors_name_the_key() -> None:
    with pytest.raises(BRPGInputError, match=r"model.multi_grid=\[2, 4\] has 2 entries; the last stage has 3"):
        Segmentor(C, **{**reduced_kwargs("resnet101s"), "multi_grid": [2, 4]})
    mit = Segmentor(C, **reduced_kwargs("mit"))
    with pytest.raises(BRPGInputError, match="needs a ResNet encoder with bottleneck blocks"):
        apply_multi_grid(mit.encoder, [2, 2, 4])


# ---------------------------------------------------------------- weights: offline error, local file
@pytest.fixture
def offline(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access and an empty cache: what a machine without a network sees."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("encoder", ["tu-resnet10t", "mit_b0"])
def test_offline_imagenet_is_one_line_naming_both_options(offline, encoder: str) -> None:
    kwargs = {"arch": "segformer", "head": "linear"} if encoder.startswith("mit") else {}
    with pytest.raises(BRPGInputError) as err:
        Segmentor(C, encoder_name=encoder, encoder_weights="imagenet", **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"model.encoder_weights=imagenet: cannot download the {encoder}")
    assert "model.weights_path=<file>" in msg and "model.encoder_weights=null" in msg


def test_local_weights_replace_the_download_offline(offline, tmp_path) -> None:
    torch.manual_seed(0)
    source = Segmentor(C, encoder_name="tu-resnet10t", decoder_channels=16)
    path = tmp_path / "imagenet_encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    loaded = Segmentor(C, encoder_name="tu-resnet10t", decoder_channels=16, encoder_weights="imagenet",
                       weights_path=str(path))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key
    assert ", 0 missing, 0 unexpected" in loaded.weights_summary


@pytest.mark.parametrize("name", ["resnet101s", "xception65"])
def test_timm_checkpoint_loads_with_mismatch_report(tmp_path, name: str) -> None:
    """A timm ImageNet classifier checkpoint (no ``model.`` prefix, unflattened names, a classifier head) into
    the ``tu-`` builder: the encoder then computes what timm's own network computes; the head is reported."""
    torch.manual_seed(3)
    arch = {k: v for k, v in reduced_kwargs(name).items() if k in ("layers", "channels", "stem_width", "block_cfg")}
    classifier = timm.create_model(name, output_stride=8, **arch).eval()  # timm's ImageNet checkpoint layout
    state = classifier.state_dict()
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    model = Segmentor(21, **reduced_kwargs(name), encoder_weights="imagenet", weights_path=str(path)).eval()
    n = len(model.encoder.state_dict())
    head = [k for k in state if k.startswith(("fc.", "head."))]
    assert f"{n}/{n} tensors, 0 missing, {len(head)} unexpected (e.g. model.{head[0]})" in model.weights_summary
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.encoder(x)[-1], classifier.forward_features(x), atol=1e-5)
    dropped = next(iter(state))
    del state[dropped]
    torch.save(state, path)
    partial = Segmentor(21, **reduced_kwargs(name), weights_path=str(path))
    assert f"{n - 1}/{n} tensors, 1 missing (e.g. model." in partial.weights_summary
