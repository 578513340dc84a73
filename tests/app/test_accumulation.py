"""Gradient accumulation end to end: ``trainer.accumulate_grad_batches=4`` at batch 2 against batch 8 at 1.

The same images are seen per optimiser step, so every per-step counter must agree: ``global_step``, the poly
schedule's position and lr, the EMA teacher's update count and decay ramp, BRPG's class-threshold and prototype
EMA steps. The weights do not (BatchNorm normalises over each micro-batch, CutMix draws per batch); the memory's
bank contents and EMA values are compared on fixed features in ``tests/brpg/test_accumulation.py``. The teacher is
checked to be the EMA of the student after each optimiser step and untouched after the other micro-batches.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch

import brpg_lightning.brpg.prototype_memory as prototype_memory
import brpg_lightning.train as train_mod
from brpg_lightning.errors import BRPGInputError

WATCHED = "classifier"  # a parameter name prefix of the segmentor: its small classification head


def _watched(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters() if n.startswith(WATCHED)}


class TeacherRecorder(pl.Callback):
    """Per training batch: whether it stepped the optimiser (global_step moved), the teacher before the EMA update
    (at the batch's start, or just before the optimiser step: after the copy of the teacher's first step), the
    student and the teacher after it (the method updates its teacher inside ``optimizer_step``, before the
    callbacks' ``on_train_batch_end``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._step0 = 0
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._step0 = trainer.global_step
        self._before = _watched(pl_module.teacher.module)
        self._ready0 = bool(pl_module.teacher_ready)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self._before = _watched(pl_module.teacher.module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.rows.append({
            "epoch": trainer.current_epoch, "batch_idx": batch_idx, "stepped": trainer.global_step > self._step0,
            "ready": bool(pl_module.teacher_ready), "ready_before": self._ready0, "t": int(pl_module.teacher.steps),
            "student": _watched(pl_module.student), "before": self._before,
            "after": _watched(pl_module.teacher.module),
        })


def run(tiny_cfg, monkeypatch, batch: int, batches: int, accumulate: int) -> dict[str, Any]:
    calls = {"thresholds": 0, "prototypes": 0}

    def counting(name, fn):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(prototype_memory, "update_class_thresholds",
                        counting("thresholds", prototype_memory.update_class_thresholds))
    monkeypatch.setattr(prototype_memory, "ema_update", counting("prototypes", prototype_memory.ema_update))
    recorder = TeacherRecorder()
    build_callbacks = train_mod.build_callbacks
    monkeypatch.setattr(train_mod, "build_callbacks", lambda cfg: [*build_callbacks(cfg), recorder])
    cfg = tiny_cfg(
        f"dataset.batch_size_labeled={batch}", f"dataset.batch_size_unlabeled={batch}", "dataset.crop_size=32",
        f"trainer.limit_train_batches={batches}", f"trainer.accumulate_grad_batches={accumulate}",
        "++brpg.class_thresholds=true", "trainer.check_val_every_n_epoch=3", "overwrite=true",
    )
    _, objects = train_mod.train(cfg)
    monkeypatch.undo()
    trainer, module = objects["trainer"], objects["module"]
    sched = trainer.lr_scheduler_configs[0].scheduler
    return {
        "global_step": trainer.global_step, "total_steps": module.total_steps, "sched": sched.last_epoch,
        "lr": [g["lr"] for g in trainer.optimizers[0].param_groups], "teacher_t": int(module.teacher.steps),
        "calls": calls, "rows": recorder.rows, "module": module,
    }


def check_teacher_is_ema_of_student(rows: list[dict[str, Any]], accumulate: int, decay_cap: float = 0.99) -> None:
    """After an optimiser step: teacher = lerp(teacher, student, 1 - d), d = min(1 - 1/(t+1), cap), t = optimiser
    steps since the copy (counted here); after any other batch the teacher is unchanged."""
    t = 0
    for row in rows:
        assert row["stepped"] == ((row["batch_idx"] + 1) % accumulate == 0), row["batch_idx"]
        if not row["ready"]:  # supervised warm-up: no teacher updates
            continue
        if not row["stepped"]:
            if not row["ready_before"]:  # the batch that copied the student into the teacher
                continue
            for name, before in row["before"].items():
                assert torch.equal(row["after"][name], before), (row["epoch"], row["batch_idx"], name)
            continue
        d = min(1.0 - 1.0 / (t + 1), decay_cap)
        for name, before in row["before"].items():
            torch.testing.assert_close(row["after"][name], torch.lerp(before, row["student"][name], 1.0 - d))
        t += 1
    assert t > 0 and rows[-1]["t"] == t


@pytest.mark.slow
def test_accumulate_4_of_2_advances_like_one_batch_of_8(tiny_cfg, monkeypatch) -> None:
    """3 epochs (sup-only, sampling, prototypes), 2 optimiser steps each: 8 micro-batches of 2 x 4 vs 2 of 8."""
    acc = run(tiny_cfg, monkeypatch, batch=2, batches=8, accumulate=4)
    one = run(tiny_cfg, monkeypatch, batch=8, batches=2, accumulate=1)
    assert acc["global_step"] == one["global_step"] == 6
    assert acc["total_steps"] == one["total_steps"] == 6
    assert acc["sched"] == one["sched"] == 6 and acc["lr"] == pytest.approx(one["lr"])
    # teacher copied at the first step of epoch 1, one EMA update per optimiser step since: 4
    assert acc["teacher_t"] == one["teacher_t"] == 4
    # class thresholds: the 2 optimiser steps of the sampling epoch; prototype EMA: the 2 of the prototype epoch
    assert acc["calls"] == one["calls"] == {"thresholds": 2, "prototypes": 2}
    check_teacher_is_ema_of_student(acc["rows"], accumulate=4)
    check_teacher_is_ema_of_student(one["rows"], accumulate=1)
    assert acc["module"].student.training  # sanity: the run ended in Lightning's hands, not ours


@pytest.mark.parametrize("value", [0, 2.5, "two"])
def test_bad_accumulate_grad_batches_is_one_line(tiny_cfg, value) -> None:
    """``trainer.accumulate_grad_batches`` must be an integer >= 1: one line, before anything is built."""
    with pytest.raises(BRPGInputError, match=r"^trainer\.accumulate_grad_batches=.*: expected an integer >= 1$"):
        train_mod.train(tiny_cfg(f"trainer.accumulate_grad_batches={value}"))
