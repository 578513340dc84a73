"""FixMatch and CPS: pseudo-label sources, losses against brute force, two networks, parameter groups,
BRPG per network, and short synthetic runs through clustering (slow)."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.cps import CPS
from brpg_lightning.methods.cutmix import cutmix_box
from brpg_lightning.methods.fixmatch import FixMatch, fixmatch_loss
from brpg_lightning.models.segmentor import Segmentor
from tests.conftest import optim_node, random_semi_batch

C, H, W = 3, 32, 32
OPTIM = optim_node(lr=0.01)


def batch(b: int = 2) -> dict:
    return random_semi_batch(b, C, H, W)


def Epoch(module, epoch: int) -> None:  # noqa: N802 - reads like the state it sets
    """Trainer state for calling ``compute_step`` outside ``fit``: epoch ``epoch`` of 4, 100 steps in all."""
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, accelerator="cpu")
    module.trainer = trainer
    trainer.fit_loop.epoch_progress.current.completed = epoch
    module._total_steps = 100


def segmentor(seed: int) -> Segmentor:
    torch.manual_seed(seed)  # no dropout: train-mode forwards are repeatable
    return Segmentor(C, encoder_name="resnet18", decoder_channels=16, feature_dim=8, head_dropout=0.0,
                     decoder_aspp_dropout=0.0)


def official(logits: torch.Tensor) -> torch.Tensor:
    """The official code's upsampling to the crop (the segmentors' default geometry)."""
    return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=True)


def _reference_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-pixel loop: the sum of ``-log softmax(logits)[target]`` over non-ignored pixels where ``weight``."""
    total = torch.zeros(())
    for b in range(target.shape[0]):
        for i in range(target.shape[1]):
            for j in range(target.shape[2]):
                t = int(target[b, i, j])
                if t != IGNORE_INDEX and bool(weight[b, i, j]):
                    total = total - torch.log_softmax(logits[b, :, i, j].double(), 0)[t]
    return total


def test_fixmatch_loss_matches_a_pixel_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, C, 5, 6, generator=g)
    target = torch.randint(0, C, (2, 5, 6), generator=g)
    target[0, :2] = IGNORE_INDEX
    conf = torch.rand(2, 5, 6, generator=g)
    got = fixmatch_loss(logits, target, conf, eta=0.5)
    valid = (target != IGNORE_INDEX).sum()
    expected = _reference_ce(logits, target, conf >= 0.5) / valid  # UniMatch: / all valid pixels
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_fixmatch_pseudo_labels_from_its_own_weak_view_and_thresholded_loss() -> None:
    module = FixMatch(segmentor(0), C, optim=OPTIM, cutmix_p=0.0, eta=0.0)
    Epoch(module, epoch=0)
    module.log = lambda *a, **k: None
    b = batch()
    ctx = module.method_step(b)
    x_l, u = b["labeled"]["image"], b["unlabeled"]
    with torch.no_grad():  # reference: the same network, same joint train-mode forward
        ref = module.student(torch.cat([x_l, u["image"]]))
        probs = torch.softmax(official(ref.logits[2:]), 1)
    conf, label = probs.max(1)
    assert torch.equal(ctx.pseudo_labels, label) and torch.allclose(ctx.pseudo_confidence, conf)
    assert ctx.unlabeled_teacher.logits.requires_grad is False  # detached weak view (BRPG bank features)
    assert ctx.unlabeled_student.logits.requires_grad
    assert set(ctx.losses) == {"L_s", "L_u"} and ctx.network == "student"
    # the strong view is trained on the weak-view labels where conf >= eta: a pixel loop on the student's output
    assert ctx.unlabeled_student.align_corners and ctx.unlabeled_teacher.align_corners
    logits_s = official(ctx.unlabeled_student.logits.detach())
    expected = _reference_ce(logits_s, label, torch.ones_like(label, dtype=torch.bool)) / label.numel()
    assert torch.allclose(ctx.losses["L_u"].double(), expected, atol=1e-5)
    module.eta = 1.01  # nothing passes the threshold: no unsupervised signal
    assert float(module.method_step(b).losses["L_u"].detach()) == 0.0


def make_cps(**kwargs) -> CPS:
    return CPS(segmentor(0), C, optim=OPTIM, segmentor2=segmentor(1), cutmix_p=0.0, **kwargs)


def test_cps_networks_supervise_each_other_with_hard_labels() -> None:
    module = make_cps()
    Epoch(module, epoch=0)
    b = batch()
    nets = [copy.deepcopy(module.student), copy.deepcopy(module.net2)]  # before the step moves BN statistics
    ctx1, ctx2 = module.method_step(b)
    assert (ctx1.network, ctx2.network) == ("net1", "net2")
    labels = []
    with torch.no_grad():
        for net in nets:
            out = net(b["unlabeled"]["image"])
            labels.append(official(out.logits).argmax(1))
    assert not torch.equal(labels[0], labels[1])  # different initialisations disagree
    assert torch.equal(ctx1.pseudo_labels, labels[1]) and torch.equal(ctx2.pseudo_labels, labels[0])
    for ctx, target in ((ctx1, labels[1]), (ctx2, labels[0])):
        logits_u = official(ctx.unlabeled_student.logits.detach())
        expected = 1.5 * _reference_ce(logits_u, target, torch.ones_like(target, dtype=torch.bool)) / target.numel()
        assert torch.allclose(ctx.losses["L_cps"].double(), expected, atol=1e-5)
        assert set(ctx.losses) == {"L_s", "L_cps"}
    # each context carries its own network's forwards: BRPG banks stay in that network's feature space
    with torch.no_grad():
        own = nets[1](b["unlabeled"]["image"]).features
    assert torch.allclose(ctx2.unlabeled_teacher.features, own, atol=1e-5)


def test_cps_evaluation_net1_or_mean_of_logits() -> None:
    x = torch.randn(2, 3, H, W)
    module = make_cps(eval_on="mean").eval()
    with torch.no_grad():
        a, b = module.student(x).logits, module.net2(x).logits
        got = module.predict_logits(x, (H, W))
        assert torch.allclose(got, official((a + b) / 2), atol=1e-6)
        module.eval_on = "net1"
        assert torch.allclose(module.predict_logits(x, (H, W)), official(a))
    with pytest.raises(BRPGInputError, match="method.eval_on='both'"):
        make_cps(eval_on="both")


def test_param_groups_heads_at_10x_for_every_network() -> None:
    module = make_cps()
    Epoch(module, epoch=0)
    opt = module.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["backbone", "head", "net2/backbone", "net2/head"]
    assert [groups[k]["lr"] for k in groups] == [0.01, 0.1, 0.01, 0.1]
    for prefix, net in (("", module.student), ("net2/", module.net2)):
        assert {id(p) for p in groups[f"{prefix}backbone"]["params"]} == {id(p) for p in net.encoder.parameters()}
        head = {id(p) for p in groups[f"{prefix}head"]["params"]}
        assert head == {id(p) for p in net.parameters()} - {id(p) for p in net.encoder.parameters()}
    adamw = FixMatch(segmentor(0), C, optim=optim_node("adamw", lr=6e-5, weight_decay=0.01))
    Epoch(adamw, epoch=0)
    opt = adamw.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("backbone", 6e-5, 0.01), ("head", pytest.approx(6e-4), 0.01)
    ]


# ---------------------------------------------------------------- the real entry point (slow)
@pytest.mark.slow
def test_fixmatch_and_cps_train_with_brpg_through_clustering(tiny_cfg, tmp_path) -> None:
    from brpg_lightning.brpg.callback import brpg_callbacks
    from brpg_lightning.train import build_module, train

    cfg = tiny_cfg("method=cps", "brpg=cpg_apo")
    module = build_module(cfg, class_names=None)
    pairs = list(zip(module.student.parameters(), module.net2.parameters(), strict=True))
    # every weight tensor drawn anew (encoder_weights=null): different initialisations (BN starts at 1, 0 in both)
    assert all(not torch.equal(a, b) for a, b in pairs if a.ndim > 1)

    for method in ("fixmatch", "cps"):
        cfg = tiny_cfg(f"method={method}", "brpg=cpg_apo", f"paths.output_dir={tmp_path / method}")
        summary, objects = train(cfg)
        assert math.isfinite(summary["final_mIoU"])
        brpg = list(brpg_callbacks(objects["trainer"]).values())
        names = ["student"] if method == "fixmatch" else ["net1", "net2"]
        assert [c.network for c in brpg] == names
        for cb in brpg:
            assert cb.memory.prototypes is not None and bool(cb.memory.proto_mask.any())  # clustered at T_S2
        metrics = summary["metrics"]
        if method == "cps":
            assert not torch.equal(brpg[0].memory.prototypes, brpg[1].memory.prototypes)
            assert {"brpg/net1/L_pro_l", "brpg/net2/L_pro_l", "train/net1/L_cps", "train/net2/L_pro"} <= set(metrics)
            assert (tmp_path / "cps" / "brpg" / "snapshot_net2.pt").is_file()
            ckpt = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=False)
            keys = [k for k in ckpt["callbacks"] if k.startswith("BRPGCallback")]
            assert sorted(keys) == ["BRPGCallback{'network': 'net1'}", "BRPGCallback{'network': 'net2'}"]
        else:
            assert {"brpg/L_pro_l", "train/L_u", "train/L_pro"} <= set(metrics)
            assert (tmp_path / "fixmatch" / "brpg" / "snapshot.pt").is_file()
        # one device: plain BatchNorm without any user change (trainer=ddp sets sync_batchnorm)
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in objects["module"].modules())
        assert cfg.trainer.get("sync_batchnorm") in (None, False)


@pytest.mark.parametrize("method", ["supervised", "mean_teacher", "fixmatch", "cps", "unimatch", "unimatch_v2"])
def test_every_method_composes_with_every_brpg_option_and_paper_model(method: str, tmp_path) -> None:
    from hydra.utils import get_class

    from brpg_lightning.brpg.callback import BRPGCallback
    from brpg_lightning.train import build_callbacks
    from tests.conftest import compose_cfg

    networks = get_class(compose_cfg(f"method={method}", output_dir=tmp_path).method._target_).networks
    for brpg in ("none", "plain", "cpg", "cpg_apo"):
        cfg = compose_cfg(f"method={method}", f"brpg={brpg}", output_dir=tmp_path)
        got = [c.network for c in build_callbacks(cfg) if isinstance(c, BRPGCallback)]
        assert got == ([] if brpg == "none" else (["student"] if len(networks) == 1 else list(networks)))
    for model in ("deeplabv3plus", "deeplabv3plus_xception65", "segformer"):
        cfg = compose_cfg(f"method={method}", f"model={model}", output_dir=tmp_path)
        assert cfg.model.encoder_weights == "imagenet" and cfg.model.feature_dim == 256


def test_fixmatch_step_unsupervised_loss_by_hand() -> None:
    """One FixMatch step with CutMix on, padded pixels and lambda_u = 0.6, L_u worked from UniMatch's semantics.

    UniMatch ``fixmatch.py``: the weak half of the joint train-mode forward gives ``conf, mask = softmax.max``;
    ignore_mask = 255 on padding; both are CutMix'd with the strong images (image i takes image i+1 inside its
    box); ``loss_u = sum(CE * ((conf >= 0.95) & (ignore != 255))) / sum(ignore != 255)``.
    """
    torch.manual_seed(0)
    module = FixMatch(segmentor(0), C, optim=OPTIM, lambda_u=0.6, eta=0.95, cutmix_p=1.0)
    b = batch(3)
    valid = torch.ones(3, H, W, dtype=torch.bool)
    valid[1, :, 24:] = False
    b["unlabeled"]["valid"] = valid
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    net = copy.deepcopy(module.student).train()
    with torch.no_grad():
        x_l, x_w, x_s0 = b["labeled"]["image"], b["unlabeled"]["image"], b["unlabeled"]["image_strong"]
        probs = torch.softmax(F.interpolate(net(torch.cat([x_l, x_w])).logits[3:], (H, W), mode="bilinear", align_corners=True), 1)
    module.eta = float(probs.max(1).values.median())  # so that about half the pixels pass
    torch.manual_seed(7)
    ctx = module.method_step(b)
    torch.manual_seed(7)
    torch.rand(())  # the batch's coin
    boxes = [cutmix_box(H, W) for _ in range(3)]
    conf_w, mask_w = probs.max(1)
    ignore_w = torch.where(valid, 0, 255)
    x_s, conf, mask, ignore = x_s0.clone(), conf_w.clone(), mask_w.clone(), ignore_w.clone()
    for i in range(3):
        src = (i + 1) % 3
        x_s[i][:, boxes[i]] = x_s0[src][:, boxes[i]]
        conf[i][boxes[i]], mask[i][boxes[i]], ignore[i][boxes[i]] = (
            conf_w[src][boxes[i]], mask_w[src][boxes[i]], ignore_w[src][boxes[i]])
    with torch.no_grad():
        logits_s = F.interpolate(net(x_s).logits, (H, W), mode="bilinear", align_corners=True)
    weight = (conf >= module.eta) & (ignore != 255)
    expected = _reference_ce(logits_s, mask, weight) / (ignore != 255).sum()
    assert 0 < int(weight.sum()) < int((ignore != 255).sum())
    assert torch.allclose(ctx.losses["L_u"].double(), 0.6 * expected, rtol=1e-5)
