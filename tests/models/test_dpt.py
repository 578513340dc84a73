"""DPT on a patch-14 DINOv2 (``model=dpt_dinov2_*``): geometry, padding, offline weights, a short run with BRPG,
ONNX export with parity; ``model.freeze_encoder`` on the default model through a real run."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from tests.models.test_paper_networks import offline  # noqa: F401 - the fixture: no hub, an empty cache

from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.segmentor import Segmentor

C, D = 3, 16
VIT = {"embed_dim": 48, "num_heads": 2, "img_size": 56}  # timm kwargs: a ViT-S/14 with 12 narrow blocks
TINY_DPT = dict(arch="dpt", encoder_name="tu-vit_small_patch14_dinov2", encoder_weights=None, dynamic_img_size=True,
                decoder_intermediate_channels=[8, 16, 32, 32], decoder_fusion_channels=16, feature_dim=D, **VIT)
TINY_OVERRIDES = (
    "model=dpt_dinov2_small",
    "model.encoder_weights=null",
    "model.decoder_intermediate_channels=[8,16,32,32]",
    "model.decoder_fusion_channels=16",
    *(f"++model.{k}={v}" for k, v in VIT.items()),
)


@pytest.fixture(scope="module")
def dpt() -> Segmentor:
    torch.manual_seed(0)
    return Segmentor(C, **TINY_DPT).eval()


def test_dpt_geometry_stride_2_padding_to_28_and_unimatch_v2_blocks(dpt: Segmentor) -> None:
    assert (dpt.stride, dpt.pad_multiple, dpt.decoder_channels) == (2, 28, 16)
    assert dpt.encoder.indices == [2, 5, 8, 11]  # UniMatch V2's intermediate_layer_idx for small / base
    with torch.no_grad():
        out = dpt(torch.randn(2, 3, 64, 50))
    assert out.stride == 2 and out.align_corners
    assert out.logits.shape == (2, C, 32, 25) and out.features.shape == (2, D, 32, 25)
    assert out.logits_at((64, 50)).shape == (2, C, 64, 50)


def test_dpt_non_multiple_input_equals_explicit_pad_and_crop(dpt: Segmentor) -> None:
    x = torch.randn(1, 3, 64, 50)
    padded = F.pad(x, (0, 56 - 50, 0, 84 - 64))  # by hand: zeros bottom/right to multiples of 28
    with torch.no_grad():
        out = dpt(x)
        feats = dpt.encoder.model.forward_intermediates(padded, indices=[2, 5, 8, 11], norm=True,
                                                         intermediates_only=True)
        assert [tuple(f.shape[-2:]) for f in feats] == [(6, 4)] * 4  # 84 / 14, 56 / 14 tokens
        dec = dpt.decoder(feats)
        logits = dpt.classifier(dec)
    assert dec.shape[-2:] == (42, 28)  # 7 cells per token: stride 2
    assert torch.equal(out.logits, logits[..., :32, :25])  # ceil(64 / 2), ceil(50 / 2)
    assert torch.equal(out.decoder, dec[..., :32, :25])


def test_dpt_sliding_window_with_non_multiple_windows(dpt: Segmentor) -> None:
    from brpg_lightning.models.inference import sliding_window_logits

    x = torch.randn(1, 3, 50, 90)
    with torch.no_grad():
        got = sliding_window_logits(lambda w: dpt(w).logits_at(tuple(w.shape[-2:])), x, crop=50, stride=40)
        left, right = dpt(x[..., :50]).logits_at((50, 50)), dpt(x[..., 40:]).logits_at((50, 50))
    want = torch.zeros(1, C, 50, 90)  # by hand: windows [0, 50) and [40, 90), the overlap [40, 50) averaged
    want[..., :40], want[..., 50:] = left[..., :40], right[..., 10:]
    want[..., 40:50] = (left[..., 40:] + right[..., :10]) / 2
    assert torch.allclose(got, want, atol=1e-6)


def test_dpt_loads_a_timm_dinov2_state_dict_offline(tmp_path) -> None:
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **VIT)
    path = tmp_path / "dinov2_small.pth"
    torch.save(vit.state_dict(), path)  # the classifier's names, as timm or the official DINOv2 file has them
    seg = Segmentor(C, **{**TINY_DPT, "encoder_weights": "lvd142m"}, weights_path=str(path))
    n = len(seg.encoder.state_dict())
    assert seg.weights_summary.endswith(f"{n}/{n} tensors, 0 missing, 0 unexpected")
    assert torch.equal(seg.encoder.model.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)
    with pytest.raises(BRPGInputError, match=r"model.weights_path=.*missing.pth"):
        Segmentor(C, **TINY_DPT, weights_path=str(tmp_path / "missing.pth"))


def test_dpt_offline_download_is_one_line_naming_both_options(offline) -> None:  # noqa: F811
    with pytest.raises(BRPGInputError) as err:
        Segmentor(C, **{**TINY_DPT, "encoder_weights": "lvd142m"})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("model.encoder_weights=lvd142m: cannot download the tu-vit_small_patch14_dinov2 weights")
    assert "model.weights_path=<file>" in msg and "model.encoder_weights=null" in msg


@pytest.mark.parametrize("name", ["dpt_dinov2_small", "dpt_dinov2_base", "dpt_dinov3_small"])
def test_model_configs_compose_with_uni_match_v2_recipes(name: str) -> None:
    from tests.conftest import compose_cfg

    cfg = compose_cfg(f"model={name}", "dataset=pascal")
    assert cfg.model.arch == "dpt" and cfg.model.freeze_encoder is False
    if "dinov2" in name:  # configs/pascal.yaml of UniMatch-V2 and its AdamW
        assert (cfg.dataset.crop_size, cfg.optim.optimizer.lr, cfg.optim.head_lr_mult) == (518, 5e-6, 40.0)
        assert cfg.optim.optimizer._target_ == "torch.optim.AdamW" and cfg.trainer.max_epochs == 60
        city = compose_cfg(f"model={name}", "dataset=cityscapes")
        assert (city.dataset.crop_size, city.dataset.val_crop_size, city.trainer.max_epochs) == (798, 798, 180)


@pytest.mark.slow
def test_tiny_dpt_trains_with_brpg_and_exports_to_onnx_with_parity(tiny_cfg, tmp_path) -> None:
    from tests.app.test_export import assert_verified, export_cfg

    from brpg_lightning.brpg.callback import brpg_callbacks
    from brpg_lightning.export import export

    summary, objects = train_run(tiny_cfg(*TINY_OVERRIDES))
    assert math.isfinite(summary["final_mIoU"]) and "train/L_pro" in summary["metrics"]
    memory = next(iter(brpg_callbacks(objects["trainer"]).values())).memory
    assert memory.prototypes is not None
    assert objects["module"].student.stride == 2
    result = export(export_cfg(summary["last_checkpoint"], "onnx", tmp_path / "dpt.onnx"))
    assert_verified(result)


def train_run(cfg):  # noqa: ANN001, ANN201
    from brpg_lightning.train import train

    return train(cfg)


# ---------------------------------------------------------------- model.freeze_encoder
def test_freeze_encoder_keeps_eval_mode_and_leaves_the_optimiser_groups() -> None:
    seg = Segmentor(C, encoder_name="resnet18", decoder_channels=16, feature_dim=D, freeze_encoder=True)
    seg.train()
    assert not any(m.training for m in seg.encoder.modules())
    assert seg.decoder.training and seg.classifier.training
    groups = seg.param_groups()
    assert groups["backbone"] == [] and len(groups["head"]) == len(
        [p for m in (seg.decoder, seg.classifier, seg.feature_head) for p in m.parameters()])


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("frozen", [True, False])
def test_freeze_encoder_through_a_real_run(frozen: bool, tiny_cfg) -> None:
    """The default model (BatchNorm in its encoder) trained by mean teacher + BRPG: with the encoder frozen, the
    student's and teacher's encoder parameters and BN buffers are bit-identical to the initial ones, the
    decoder's moved, and no encoder parameter is in the optimiser; unfrozen (control) the encoder moves."""
    from brpg_lightning.train import build_datamodule, build_module

    cfg = tiny_cfg(f"model.freeze_encoder={str(frozen).lower()}", "trainer.max_epochs=2", "+trainer.max_steps=4",
                   "sup_only_epochs=1")
    pl.seed_everything(int(cfg.seed), workers=True)  # the initial weights, as train() builds them
    initial = build_module(cfg, class_names=build_datamodule(cfg).class_names).student
    enc0, dec0 = _state(initial.encoder), _state(initial.decoder)
    summary, objects = train_run(cfg)
    module = objects["module"]
    student, teacher = module.student, module.teacher.module
    assert summary["metrics"]  # it trained
    dec_moved = any(not torch.equal(v, dec0[k]) for k, v in student.decoder.state_dict().items())
    assert dec_moved
    enc_same = [torch.equal(v, enc0[k]) for k, v in student.encoder.state_dict().items()]
    bn_buffers = [k for k in enc0 if k.endswith("running_mean")]
    assert bn_buffers
    encoder_ids = {id(p) for p in student.encoder.parameters()}
    in_optimiser = {id(p) for g in objects["trainer"].optimizers[0].param_groups for p in g["params"]}
    if frozen:
        assert all(enc_same)
        assert all(torch.equal(v, enc0[k]) for k, v in teacher.encoder.state_dict().items())
        assert not encoder_ids & in_optimiser
    else:
        assert not all(enc_same) and encoder_ids <= in_optimiser
