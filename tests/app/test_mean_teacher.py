"""The mean-teacher step: teacher copy, EMA ramp after the optimiser step, losses of Eq. (7)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from brpg_lightning.methods.mean_teacher import MeanTeacher
from brpg_lightning.models.segmentor import Segmentor
from tests.conftest import random_semi_batch

C, H, W = 3, 32, 32


def make_module(**kwargs) -> MeanTeacher:
    torch.manual_seed(0)
    seg = Segmentor(C, encoder_name="resnet18", decoder_channels=16, feature_dim=8)
    return MeanTeacher(seg, C, optim={"name": "sgd", "lr": 0.01}, sup_only_epochs=1, cutmix_p=0.0, **kwargs)


def batch(b: int = 2) -> dict:
    return random_semi_batch(b, C, H, W)


class Epoch:
    """Stand-in trainer state for calling compute_step outside a Trainer."""

    def __init__(self, module: MeanTeacher, epoch: int, max_epochs: int = 4) -> None:
        trainer = pl.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, accelerator="cpu")
        module.trainer = trainer
        trainer.fit_loop.epoch_progress.current.completed = epoch
        module._total_steps = 100


def test_supervised_only_epochs_then_exact_copy() -> None:
    module = make_module(teacher_bn="ema")  # "own" then moves the teacher's BN statistics by its own forward
    Epoch(module, epoch=0)
    ctx = module.compute_step(batch())
    assert set(ctx.losses) == {"L_s"} and not ctx.has_unlabeled and not bool(module.teacher_ready)
    assert module.eval_model is module.student

    with torch.no_grad():  # the student moves during the sup-only epoch
        for p in module.student.parameters():
            p.add_(0.1)
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    before = {k: v.clone() for k, v in module.student.state_dict().items()}  # the step's forward moves BN stats
    ctx = module.compute_step(batch())
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
        module.on_train_batch_end(None, None, t)
        d = min(1 - 1 / (t + 1), 0.99)  # U2PL ramp, t = steps since the copy
        expected = d * teacher_before + (1 - d) * student_now
        assert torch.allclose(dict(module.teacher.module.named_parameters())[name], expected, atol=1e-6)


def test_pseudo_labels_come_from_the_teacher_weak_view() -> None:
    module = make_module(unsup_filter="confidence", eta=0.0, teacher_bn="ema")  # teacher unchanged by the step
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    b = batch()
    ctx = module.compute_step(b)
    with torch.no_grad():
        module.teacher.eval()
        out = module.teacher(b["unlabeled"]["image"])
        from brpg_lightning.models.output import resize_to_input

        probs = torch.softmax(resize_to_input(out.logits, (H, W), out.stride), 1)
    conf, label = probs.max(1)
    assert torch.equal(ctx.pseudo_labels, label)  # cutmix_p=0: unmixed
    assert torch.allclose(ctx.pseudo_confidence, conf)
