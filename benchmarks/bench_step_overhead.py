"""Step overhead of BRPG on top of mean teacher at CPU scale (256-d features, crop 321, batch 2+2).

One full training step = mean-teacher forward passes and losses, the BRPG callback (when on), backward,
SGD step and teacher EMA update. The three variants are measured interleaved (A, B, C, A, B, C, ...) in one
process on the same model and data, and compared by median step time:

- sampling stage: BRPG selects/caps/pushes features into 2 x C banks of V=30000 (float16) each step;
- prototype stage: BRPG adds L_pro (grid 32x32 + 1000 random points per image) and updates prototypes.

Targets (issue): sampling <= 1.10x, prototype stage <= 1.05x of mean teacher alone.
"""

from __future__ import annotations

import statistics
import time

import pytorch_lightning as pl
import torch

from benchmarks.common import environment, fmt_times, ratio_line
from brpg_lightning.brpg.callback import BRPGCallback
from brpg_lightning.methods.mean_teacher import MeanTeacher
from brpg_lightning.models.segmentor import Segmentor

NUM_CLASSES = 21


def make_module(crop: int) -> MeanTeacher:
    torch.manual_seed(0)
    seg = Segmentor(NUM_CLASSES, encoder_name="resnet18", decoder_channels=64, feature_dim=256)
    module = MeanTeacher(seg, NUM_CLASSES, optim={"name": "sgd", "lr": 1e-3})
    trainer = pl.Trainer(max_epochs=10, logger=False, enable_checkpointing=False, accelerator="cpu")
    module.trainer = trainer
    trainer.fit_loop.epoch_progress.current.completed = 2  # teacher active, unlabeled branch on
    module._total_steps = 1000
    module.log = lambda *a, **k: None  # no Trainer loop: logging is a no-op
    module.teacher.copy_from(module.student)
    module.teacher_ready.fill_(True)
    return module


def make_batch(crop: int, b: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, NUM_CLASSES, (b, crop // 32, crop // 32), generator=g)
    mask = mask.repeat_interleave(32, 1).repeat_interleave(32, 2)
    mask = torch.nn.functional.pad(mask, (0, crop - mask.shape[-1], 0, crop - mask.shape[-2]), value=255)
    return {
        "labeled": {"image": torch.randn(b, 3, crop, crop, generator=g), "mask": mask},
        "unlabeled": {
            "image": torch.randn(b, 3, crop, crop, generator=g),
            "image_strong": torch.randn(b, 3, crop, crop, generator=g),
            "valid": torch.ones(b, crop, crop, dtype=torch.bool),
        },
    }


def make_callback(stage: str, module: MeanTeacher, batch: dict) -> BRPGCallback:
    cb = BRPGCallback(T_S1=0, T_S2=100 if stage == "sampling" else 3, save_snapshot=False, eta_s=0.0)
    cb.setup(None, module, "fit")
    if stage == "prototype":  # fill the banks from a few real steps, then cluster once (not timed)
        cb.T_S2 = 100
        for _ in range(2):
            with torch.no_grad():
                cb.on_train_step_context(None, module, module.compute_step(batch))
        cb.T_S2 = 3
        cb.cluster(None, module, 0)
        cb.eta_0 = cb.eta_e = 0.0  # every unlabeled pixel is a candidate: the full M_u points per image
    cb.eta_s = 0.8
    return cb


def step(module: MeanTeacher, opt: torch.optim.Optimizer, batch: dict, cb: BRPGCallback | None) -> None:
    ctx = module.compute_step(batch)
    if cb is not None:
        cb.on_train_step_context(None, module, ctx)
    ctx.total_loss().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    module.teacher.update(module.student)


def run(quick: bool) -> list[str]:
    crop, reps = (161, 3) if quick else (321, 7)
    module = make_module(crop)
    batch = make_batch(crop)
    opt = torch.optim.SGD(module.student.parameters(), lr=1e-4, momentum=0.9)
    variants = {
        "mean teacher": None,
        "+ BRPG sampling": make_callback("sampling", module, batch),
        "+ BRPG prototype stage": make_callback("prototype", module, batch),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for cb in variants.values():  # warm-up
        step(module, opt, batch, cb)
    for _ in range(reps):
        for name, cb in variants.items():
            start = time.perf_counter()
            step(module, opt, batch, cb)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [environment(), f"crop {crop}, batch 2+2, {NUM_CLASSES} classes, 256-d features, {reps} interleaved reps"]
    lines += [f"{k:>24s}: median {med[k]:.3f} s/step {fmt_times(v)}" for k, v in times.items()]
    base = med["mean teacher"]
    r_s, r_p = med["+ BRPG sampling"] / base, med["+ BRPG prototype stage"] / base
    lines.append(ratio_line("step time, sampling / mean teacher", r_s, "<= 1.10x", r_s <= 1.10))
    lines.append(ratio_line("step time, prototype stage / mean teacher", r_p, "<= 1.05x", r_p <= 1.05))
    return lines
