"""UniMatch V1 and V2: each loss against the official formula worked by hand (CutMix on, padded pixels), the
feature-perturbation stream, V2's complementary channel dropout and EMA teacher, and short runs with BRPG."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.cutmix import cutmix_box
from brpg_lightning.methods.unimatch import UniMatch, feature_dropout
from brpg_lightning.methods.unimatch_v2 import UniMatchV2, complementary_dropout, complementary_masks
from tests.app.test_fixmatch_cps import OPTIM, Epoch, _reference_ce, segmentor
from tests.conftest import random_semi_batch

C, H, W = 3, 32, 32


def unimatch_batch(b: int = 3) -> dict:
    """A batch with two strong views and padding on the right of unlabeled image 1."""
    batch = random_semi_batch(b, C, H, W)
    u = batch["unlabeled"]
    u["image_strong2"] = torch.randn(b, 3, H, W, generator=torch.Generator().manual_seed(2))
    u["valid"][1, :, 24:] = False
    return batch


def official(logits: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=True)


def mixed(x0: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """The official ``x[box == 1] = x_mix[box == 1]`` with image ``i + 1`` of the batch as ``x_mix``."""
    x = x0.clone()
    for i, box in enumerate(boxes):
        x[i][..., box] = x0[(i + 1) % len(boxes)][..., box]
    return x


def official_u_loss(logits: torch.Tensor, mask: torch.Tensor, conf: torch.Tensor, ignore: torch.Tensor,
                    thresh: float) -> torch.Tensor:
    """``criterion_u(pred, mask) * ((conf >= thresh) & (ignore != 255))).sum() / (ignore != 255).sum()`` as a
    per-pixel loop (the official ``unimatch.py`` / ``unimatch_v2.py`` unsupervised loss)."""
    label = mask.masked_fill(ignore == 255, 0)  # the official mask is a class there; the weight drops it
    return _reference_ce(logits, label, (conf >= thresh) & (ignore != 255)) / (ignore != 255).sum()


def test_feature_dropout_keeps_the_clean_copy_and_drops_whole_channels() -> None:
    torch.manual_seed(0)
    f = torch.rand(4, 16, 5, 5) + 0.1
    out, = feature_dropout(0.5)([f])
    assert out.shape == (8, 16, 5, 5) and torch.equal(out[:4], f)
    dropped = out[4:]
    zero = (dropped == 0).all(dim=(2, 3))
    kept = torch.isclose(dropped, 2 * f).all(dim=(2, 3))  # Dropout2d scales the kept channels by 1 / (1 - p)
    assert bool((zero ^ kept).all()) and 0 < int(zero.sum()) < zero.numel()


def test_two_strong_views_are_independent_draws_of_the_same_crop() -> None:
    import numpy as np

    from brpg_lightning.data.transforms import UnlabeledTransform

    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    item = UnlabeledTransform(32, strong={"color_jitter_p": 1.0}, strong_views=2)(image)
    assert item["image_strong2"].shape == item["image_strong"].shape == item["image"].shape
    assert not torch.equal(item["image_strong"], item["image_strong2"])
    assert "image_strong2" not in UnlabeledTransform(32)(image)
    assert UniMatch.strong_views == UniMatchV2.strong_views == 2  # train.build_datamodule reads it
    module = UniMatch(segmentor(0), C, optim=OPTIM)
    Epoch(module, epoch=0)
    module.log = lambda *a, **k: None
    with pytest.raises(BRPGInputError, match="two strong views"):
        module.method_step(random_semi_batch(2, C, H, W))  # a datamodule built with one strong view


def test_unimatch_fp_stream_without_dropout_is_the_weak_view() -> None:
    """With p = 0 the perturbed copy equals the clean one: L_fp is FixMatch's loss on the weak view itself."""
    module = UniMatch(segmentor(0), C, optim=OPTIM, fp_dropout=0.0, eta=0.0, cutmix_p=0.0)
    Epoch(module, epoch=0)
    module.log = lambda *a, **k: None
    b = unimatch_batch()
    ctx = module.method_step(b)
    weak = official(ctx.unlabeled_teacher.logits)
    valid = b["unlabeled"]["valid"]
    assert torch.equal(ctx.pseudo_labels, weak.argmax(1).masked_fill(~valid, IGNORE_INDEX))
    expected = _reference_ce(weak, ctx.pseudo_labels, valid) / valid.sum()
    assert torch.allclose(ctx.losses["L_fp"].double(), 0.5 * 0.5 * expected, rtol=1e-5)
    assert set(ctx.losses) == {"L_s", "L_u", "L_fp"}
    assert ctx.unlabeled_teacher.logits.requires_grad is False and ctx.unlabeled_student.logits.requires_grad


def test_unimatch_step_losses_by_hand() -> None:
    """One UniMatch step, CutMix on both strong views, padded pixels, the loss worked from ``unimatch.py``:

    ``preds, preds_fp = model(cat(img_x, img_u_w), need_fp=True)`` (Dropout2d(0.5) on the encoder maps, clean and
    dropped decoded together), ``pred_u_s1, pred_u_s2 = model(cat(img_u_s1, img_u_s2))``, pseudo-labels and
    confidences of the detached weak view, CutMix'd per strong view, and
    ``loss = (loss_x + 0.25 loss_u_s1 + 0.25 loss_u_s2 + 0.5 loss_u_w_fp) / 2``.
    """
    torch.manual_seed(0)
    module = UniMatch(segmentor(0), C, optim=OPTIM, sup_loss={"kind": "ce"}, cutmix_p=1.0)
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    b = unimatch_batch()
    net = copy.deepcopy(module.student).train()
    x_l, y_l, u = b["labeled"]["image"], b["labeled"]["mask"], b["unlabeled"]
    with torch.no_grad():  # pick a threshold about half the weak-view pixels pass (random weights are unsure)
        probe = torch.softmax(official(net(torch.cat([x_l, u["image"]])).logits[3:]), 1).max(1).values
    module.eta = float(probe.median())
    torch.manual_seed(7)
    ctx = module.method_step(b)

    torch.manual_seed(7)
    with torch.no_grad():
        feats = net.encoder(torch.cat([x_l, u["image"]]))
        feats = [torch.cat((c, nn.Dropout2d(0.5)(c))) for c in feats]
        preds, preds_fp = official(net.classifier(net.decoder(feats))).chunk(2)
        pred_x, pred_u_w = preds.split([3, 3])
        pred_u_w_fp = preds_fp[3:]
        coin1 = torch.rand(())
        box1 = [cutmix_box(H, W) for _ in range(3)]
        coin2 = torch.rand(())
        box2 = [cutmix_box(H, W) for _ in range(3)]
        assert coin1 < 1.0 and coin2 < 1.0  # cutmix_p = 1: both views mixed
        img_u_s1, img_u_s2 = mixed(u["image_strong"], box1), mixed(u["image_strong2"], box2)
        pred_u_s1, pred_u_s2 = official(net(torch.cat((img_u_s1, img_u_s2))).logits).chunk(2)
    conf_u_w, mask_u_w = pred_u_w.softmax(dim=1).max(dim=1)
    ignore_mask = torch.where(u["valid"], 0, 255)
    loss_x = F.cross_entropy(pred_x, y_l, ignore_index=255)
    thresh = module.eta
    loss_u_s1 = official_u_loss(pred_u_s1, mixed(mask_u_w, box1), mixed(conf_u_w, box1), mixed(ignore_mask, box1), thresh)
    loss_u_s2 = official_u_loss(pred_u_s2, mixed(mask_u_w, box2), mixed(conf_u_w, box2), mixed(ignore_mask, box2), thresh)
    loss_u_w_fp = official_u_loss(pred_u_w_fp, mask_u_w, conf_u_w, ignore_mask, thresh)
    loss = (loss_x + loss_u_s1 * 0.25 + loss_u_s2 * 0.25 + loss_u_w_fp * 0.5) / 2.0

    assert 0 < float(loss_u_s1) and 0 < float(loss_u_w_fp)
    assert not torch.allclose(pred_u_w_fp, pred_u_w)  # the stream is perturbed
    assert torch.allclose(ctx.losses["L_s"].double(), loss_x.double() / 2, rtol=1e-5)
    assert torch.allclose(ctx.losses["L_u"].double(), (loss_u_s1 + loss_u_s2) * 0.25 / 2, rtol=1e-5)
    assert torch.allclose(ctx.losses["L_fp"].double(), loss_u_w_fp * 0.5 / 2, rtol=1e-5)
    assert torch.allclose(ctx.total_loss().double(), loss.double(), rtol=1e-5)
    # the context: weak view (detached) for BRPG's banks, strong view 1 as the student with its mixed labels
    assert torch.allclose(official(ctx.unlabeled_teacher.logits), pred_u_w, atol=1e-5)
    assert torch.allclose(official(ctx.unlabeled_student.logits.detach()), pred_u_s1, atol=1e-5)
    assert torch.equal(ctx.cutmix_boxes, torch.stack(box1))
    mask1 = mixed(mask_u_w, box1).masked_fill(mixed(ignore_mask, box1) == 255, IGNORE_INDEX)
    assert torch.equal(ctx.pseudo_labels, mask1)
    assert torch.equal(ctx.unsup_keep, (mixed(conf_u_w, box1) >= thresh) & (mixed(ignore_mask, box1) != 255))


def test_v2_masks_are_complementary() -> None:
    torch.manual_seed(0)
    kept = torch.tensor([False, True, False, False])
    m1, m2 = complementary_masks(4, 64, kept)
    assert torch.equal(m1[1], torch.ones(64)) and torch.equal(m2[1], torch.ones(64))  # an unperturbed pair
    dropped = ~kept
    assert torch.equal(m1[dropped] + m2[dropped], torch.full((3, 64), 2.0))  # each channel in exactly one view
    assert set(m1[dropped].unique().tolist()) == {0.0, 2.0}
    assert 0.3 < float((m1[dropped] == 0).float().mean()) < 0.7  # rate 0.5

    # through the perturbation: 2 n images of ones -> the masks themselves, per encoder map (widths differ)
    n, widths = 6, (3, 8, 16)
    feats = [torch.ones(2 * n, c, 2, 2) for c in widths]
    out = complementary_dropout(0.5)(feats)
    first = out[0][:, :, 0, 0]
    unperturbed = (first == 1).all(1)
    assert int(unperturbed[:n].sum()) == int(n * 0.5) and torch.equal(unperturbed[:n], unperturbed[n:])
    for o, c in zip(out, widths, strict=True):
        a, b = o[:n, :, 0, 0], o[n:, :, 0, 0]
        assert a.shape == (n, c) and torch.equal(a + b, torch.full((n, c), 2.0))
        assert bool((o == o[:, :, :1, :1]).all())  # one value per channel: channel dropout
        assert bool(((a == 1).all(1) == unperturbed[:n]).all())  # the same pairs unperturbed on every map
    assert torch.equal(complementary_dropout(0.0)(feats)[1], feats[1])  # no pair perturbed


def test_unimatch_v2_step_losses_by_hand() -> None:
    """One UniMatch V2 step, CutMix on both views, padded pixels, the loss worked from ``unimatch_v2.py``:

    ``pred_u_w = model_ema(img_u_w)`` (eval), ``pred_x = model(img_x)``, ``pred_u_s1, pred_u_s2 =
    model(cat(img_u_s1, img_u_s2), comp_drop=True)``, ``loss = (loss_x + (loss_u_s1 + loss_u_s2) / 2) / 2``;
    then the teacher's parameters and buffers move to ``d t + (1 - d) s`` with ``d = min(1 - 1 / (iters + 1),
    0.996)``.
    """
    torch.manual_seed(0)
    module = UniMatchV2(segmentor(0), C, optim=OPTIM, sup_loss={"kind": "ce"}, cutmix_p=1.0)
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    with torch.no_grad():  # a teacher that differs from the student (as after some EMA steps)
        for p in module.teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = unimatch_batch()
    teacher, net = copy.deepcopy(module.teacher.module).eval(), copy.deepcopy(module.student).train()
    x_l, y_l, u = b["labeled"]["image"], b["labeled"]["mask"], b["unlabeled"]
    with torch.no_grad():
        pred_u_w = official(teacher(u["image"]).logits)
    conf_u_w, mask_u_w = pred_u_w.softmax(dim=1).max(dim=1)
    module.eta = float(conf_u_w.median())
    torch.manual_seed(7)
    ctx = module.method_step(b)

    torch.manual_seed(7)
    with torch.no_grad():
        box1 = (torch.rand(()), [cutmix_box(H, W) for _ in range(3)])[1]
        box2 = (torch.rand(()), [cutmix_box(H, W) for _ in range(3)])[1]
        img_u_s1, img_u_s2 = mixed(u["image_strong"], box1), mixed(u["image_strong2"], box2)
        pred_x = official(net(x_l).logits)
        feats = complementary_dropout(0.5)(net.encoder(torch.cat((img_u_s1, img_u_s2))))
        pred_u_s1, pred_u_s2 = official(net.classifier(net.decoder(feats))).chunk(2)
    ignore_mask = torch.where(u["valid"], 0, 255)
    thresh = module.eta
    loss_x = F.cross_entropy(pred_x, y_l, ignore_index=255)
    loss_u_s1 = official_u_loss(pred_u_s1, mixed(mask_u_w, box1), mixed(conf_u_w, box1), mixed(ignore_mask, box1), thresh)
    loss_u_s2 = official_u_loss(pred_u_s2, mixed(mask_u_w, box2), mixed(conf_u_w, box2), mixed(ignore_mask, box2), thresh)
    loss = (loss_x + (loss_u_s1 + loss_u_s2) / 2.0) / 2.0
    assert 0 < float(loss_u_s1) and 0 < float(loss_u_s2)
    assert torch.allclose(ctx.losses["L_s"].double(), loss_x.double() / 2, rtol=1e-5)
    assert torch.allclose(ctx.losses["L_u"].double(), (loss_u_s1 + loss_u_s2) / 4, rtol=1e-5)
    assert torch.allclose(ctx.total_loss().double(), loss.double(), rtol=1e-5)
    assert torch.allclose(official(ctx.unlabeled_teacher.logits), pred_u_w, atol=1e-5)  # the teacher's weak view
    assert torch.allclose(official(ctx.unlabeled_student.logits.detach()), pred_u_s1, atol=1e-5)
    assert torch.equal(ctx.cutmix_boxes, torch.stack(box1))

    # the EMA after the step: iteration 0 copies the student (parameters and buffers), iteration 1 is d = 0.5
    module.after_optimizer_step()
    for t, s in zip(module.teacher.module.state_dict().values(), module.student.state_dict().values(), strict=True):
        assert torch.equal(t, s)
    old = copy.deepcopy(module.teacher.module.state_dict())
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
    module.after_optimizer_step()
    for name, t in module.teacher.module.state_dict().items():
        s = module.student.state_dict()[name]
        want = 0.5 * old[name] + 0.5 * s if t.is_floating_point() else s
        assert torch.allclose(t, want.to(t.dtype))
    assert module.eval_model is module.teacher.module


# ---------------------------------------------------------------- the real entry point
@pytest.mark.parametrize("method", ["unimatch", "unimatch_v2"])
@pytest.mark.parametrize("brpg", ["none", "cpg_apo"])
def test_unimatch_trains_with_and_without_brpg(method: str, brpg: str, tiny_cfg) -> None:
    from brpg_lightning.brpg.callback import brpg_callbacks
    from brpg_lightning.train import train

    summary, objects = train(tiny_cfg(f"method={method}", f"brpg={brpg}", "sup_only_epochs=0"))
    assert math.isfinite(summary["final_mIoU"])
    assert {"train/L_u", "train/L_s"} <= set(summary["metrics"])
    callbacks = list(brpg_callbacks(objects["trainer"]).values())
    if brpg == "none":
        assert not callbacks
    else:  # through clustering at T_S2 and the prototype stage
        assert callbacks[0].memory.prototypes is not None and "train/L_pro" in summary["metrics"]
