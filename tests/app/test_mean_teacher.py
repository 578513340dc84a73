"""The mean-teacher step: teacher copy, EMA ramp after the optimiser step, losses of Eq. (7)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from brpg_lightning.methods.cutmix import cutmix_box
from brpg_lightning.methods.mean_teacher import MeanTeacher
from brpg_lightning.models.segmentor import Segmentor
from tests.conftest import optim_node, random_semi_batch

C, H, W = 3, 32, 32


def make_module(**kwargs) -> MeanTeacher:
    torch.manual_seed(0)
    seg = Segmentor(C, encoder_name="resnet18", decoder_channels=16, feature_dim=8)
    kwargs.setdefault("cutmix_p", 0.0)
    return MeanTeacher(seg, C, optim=optim_node(lr=0.01), sup_only_epochs=1, **kwargs)


def batch(b: int = 2) -> dict:
    return random_semi_batch(b, C, H, W)


def without_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """Dropout off, so a train-mode forward is a function of its input and the BN state alone."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):
            m.p = 0.0
    return module


def bn_buffers(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.named_buffers() if "running" in k or "num_batches" in k}


def upsample(logits: torch.Tensor) -> torch.Tensor:
    """The official code's upsampling of decoder maps to the crop."""
    return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=True)


class Epoch:
    """Stand-in trainer state for calling compute_step outside a Trainer."""

    def __init__(self, module: MeanTeacher, epoch: int, max_epochs: int = 4) -> None:
        trainer = pl.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, accelerator="cpu")
        module.trainer = trainer
        trainer.fit_loop.epoch_progress.current.completed = epoch
        module._total_steps = 100


def test_supervised_only_epochs_then_exact_copy() -> None:
    module = make_module(teacher_forward="weak_only")  # the copy takes BN buffers too
    Epoch(module, epoch=0)
    ctx = module.method_step(batch())
    assert set(ctx.losses) == {"L_s"} and not ctx.has_unlabeled and not bool(module.teacher_ready)
    assert module.eval_model is module.student

    with torch.no_grad():  # the student moves during the sup-only epoch
        for p in module.student.parameters():
            p.add_(0.1)
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    before = {k: v.clone() for k, v in module.student.state_dict().items()}  # the step's forward moves BN stats
    ctx = module.method_step(batch())
    assert set(ctx.losses) == {"L_s", "L_u"} and ctx.has_unlabeled
    assert module.eval_model is module.teacher.module
    teacher_state = module.teacher.module.state_dict()
    assert teacher_state.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(teacher_state[name], value), name
    assert ctx.pseudo_labels.shape == (2, H, W) and ctx.pseudo_confidence.shape == (2, H, W)
    assert torch.allclose(ctx.total_loss(), ctx.losses["L_s"] + ctx.losses["L_u"])


def test_teacher_follows_the_ramp_after_each_step() -> None:
    module = make_module()
    module.teacher.copy_from(module.student)
    module.teacher_ready.fill_(True)
    module.log = lambda *a, **k: None
    name, _ = next(iter(module.student.named_parameters()))
    for t in range(3):
        teacher_before = dict(module.teacher.module.named_parameters())[name].detach().clone()
        with torch.no_grad():
            for p in module.student.parameters():
                p.add_(0.05 * (t + 1))
        student_now = dict(module.student.named_parameters())[name].detach().clone()
        module.after_optimizer_step()
        d = min(1 - 1 / (t + 1), 0.99)  # U2PL ramp, t = steps since the copy
        expected = d * teacher_before + (1 - d) * student_now
        assert torch.allclose(dict(module.teacher.module.named_parameters())[name], expected, atol=1e-6)


def test_pseudo_labels_come_from_the_teacher_weak_view() -> None:
    module = make_module(unsup_filter="confidence", eta=0.0, teacher_forward="weak_only")  # no teacher train forward
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    b = batch()
    ctx = module.method_step(b)
    with torch.no_grad():
        module.teacher.eval()
        out = module.teacher(b["unlabeled"]["image"])
        probs = torch.softmax(upsample(out.logits), 1)
    conf, label = probs.max(1)
    assert torch.equal(ctx.pseudo_labels, label)  # cutmix_p=0: unmixed
    assert torch.allclose(ctx.pseudo_confidence, conf)


def test_teacher_keeps_its_own_bn_statistics_from_the_student_batch() -> None:
    """Official teacher: BN statistics from its own train-mode forwards; the copy and the EMA take parameters only."""
    module = without_dropout(make_module(cutmix_p=0.0))
    b = batch()
    x_l = b["labeled"]["image"]
    reference = copy.deepcopy(module.teacher.module)

    Epoch(module, epoch=0)  # warm-up: the teacher forwards the labeled images in train mode
    module.method_step(b)
    reference.train()
    with torch.no_grad():
        reference(x_l)
    assert bn_buffers(module.teacher.module).keys() == bn_buffers(reference).keys()
    for name, value in bn_buffers(reference).items():
        assert torch.equal(bn_buffers(module.teacher.module)[name], value), name

    with torch.no_grad():  # the student moves during the warm-up, and its statistics with it
        for p in module.student.parameters():
            p.add_(0.1)
        for name, buf in module.student.named_buffers():
            if "running_mean" in name:
                buf.add_(0.5)
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    student_params = {k: v.clone() for k, v in module.student.named_parameters()}
    teacher_stats = bn_buffers(module.teacher.module)
    module.method_step(b)
    # parameters copied from the student, statistics: its own, then one train forward on the student's batch
    for name, value in module.teacher.module.named_parameters():
        assert torch.equal(value, student_params[name]), name
    ref = copy.deepcopy(module.teacher.module)
    ref.load_state_dict({**{k: v for k, v in ref.state_dict().items()}, **teacher_stats})
    ref.train()
    with torch.no_grad():
        ref(torch.cat([x_l, b["unlabeled"]["image_strong"]]))  # cutmix_p=0: the strong view as it is
    for name, value in bn_buffers(ref).items():
        assert torch.equal(bn_buffers(module.teacher.module)[name], value), name

    module.after_optimizer_step()  # the EMA leaves the teacher's statistics alone
    for name, value in bn_buffers(ref).items():
        assert torch.equal(bn_buffers(module.teacher.module)[name], value), name


@pytest.mark.parametrize("lu_norm", ["paper", "official"])
def test_mean_teacher_unsupervised_loss_by_hand(lu_norm: str) -> None:
    """One step with CutMix on, padded pixels and lambda_u = 0.7, L_u worked from the official semantics.

    Pseudo-labels: eval-mode teacher on the weak view, upsampled, softmax argmax, then CutMix'd with the
    strong images (image i takes image i+1 inside its box). Filter: the entropy of the train-mode
    teacher's prediction on the student's input; the drop_percent % highest-entropy pseudo-labelled pixels
    are dropped (np.percentile). L_u: cross-entropy of the student's prediction over the kept pixels / M
    (paper), times B*H*W / M for the official normalisation. Padded pixels carry no pseudo-label.
    """
    lambda_u, drop_start, max_epochs, epoch = 0.7, 40.0, 4, 1
    module = without_dropout(make_module(cutmix_p=1.0, lambda_u=lambda_u, drop_percent_start=drop_start,
                                         lu_norm=lu_norm))
    b = batch(3)
    valid = torch.ones(3, H, W, dtype=torch.bool)
    valid[0, :, 20:] = False  # right padding of image 0
    valid[2, 25:, :] = False  # bottom padding of image 2
    b["unlabeled"]["valid"] = valid
    Epoch(module, epoch=epoch, max_epochs=max_epochs)
    module.log = lambda *a, **k: None
    module.teacher.copy_from(module.student, buffers=False)  # the copy the first semi step makes
    module.teacher_ready.fill_(True)
    teacher, student = copy.deepcopy(module.teacher.module), copy.deepcopy(module.student)

    torch.manual_seed(123)
    ctx = module.method_step(b)

    torch.manual_seed(123)  # the same draws: the coin, then one box per image
    torch.rand(())
    boxes = torch.stack([cutmix_box(H, W) for _ in range(3)])
    with torch.no_grad():
        teacher.eval()
        probs_w = torch.softmax(upsample(teacher(b["unlabeled"]["image"]).logits), 1)
        pseudo_w = probs_w.argmax(1)
        pseudo_w[~valid] = 255
        x_s, pseudo = b["unlabeled"]["image_strong"].clone(), pseudo_w.clone()
        for i in range(3):
            j = (i + 1) % 3
            for y in range(H):
                for x in range(W):
                    if boxes[i, y, x]:
                        x_s[i, :, y, x] = b["unlabeled"]["image_strong"][j, :, y, x]
                        pseudo[i, y, x] = pseudo_w[j, y, x]
        x_all = torch.cat([b["labeled"]["image"], x_s])
        teacher.train()
        p_t = torch.softmax(upsample(teacher(x_all).logits[3:]), 1)
        ent = -(p_t * torch.log(p_t + 1e-10)).sum(1)
        drop = drop_start * (1 - epoch / max_epochs)
        labelled = pseudo != 255
        thresh = np.percentile(ent[labelled].numpy(), 100 - drop)
        keep = labelled & (ent < torch.tensor(thresh, dtype=ent.dtype))
        student.train()
        logits_u = upsample(student(x_all).logits[3:])
        ce = F.cross_entropy(logits_u, pseudo.masked_fill(~keep, 255), ignore_index=255, reduction="none")
        expected = ce.sum() / keep.sum()
        if lu_norm == "official":
            expected = expected * (3 * H * W) / keep.sum()
    assert torch.equal(ctx.pseudo_labels, pseudo)
    assert 0 < int(keep.sum()) < int(labelled.sum())
    assert torch.allclose(ctx.losses["L_u"], lambda_u * expected, rtol=1e-5, atol=1e-6)


def test_weak_only_filter_reads_the_weak_view() -> None:
    """teacher_forward=weak_only: the filter reads the eval-mode weak-view probabilities (CutMix'd alike)."""
    module = without_dropout(make_module(cutmix_p=0.0, teacher_forward="weak_only", unsup_filter="confidence"))
    b = batch()
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    module.teacher.copy_from(module.student)
    module.teacher_ready.fill_(True)
    teacher, student = copy.deepcopy(module.teacher.module).eval(), copy.deepcopy(module.student).train()
    with torch.no_grad():
        conf, pseudo = torch.softmax(upsample(teacher(b["unlabeled"]["image"]).logits), 1).max(1)
        logits_u = upsample(student(torch.cat([b["labeled"]["image"], b["unlabeled"]["image_strong"]])).logits[2:])
    module.eta = float(conf.median())  # keeps about half of the pixels
    ctx = module.method_step(b)
    keep = conf >= module.eta
    assert 0 < int(keep.sum()) < keep.numel()
    ce = F.cross_entropy(logits_u, pseudo.masked_fill(~keep, 255), ignore_index=255, reduction="sum")
    assert torch.allclose(ctx.losses["L_u"], ce / keep.sum(), rtol=1e-5)
