"""Step overhead of BRPG on top of mean teacher: the paper-like case and the default run's case.

Case 1, ``default run``: the embedded default exactly as ``python -m brpg_lightning`` builds it (the composed
``conf/train.yaml``: deeplabv3plus_small, crop 64, batch 8+8, 7 synthetic classes, AdamW, BRPG ``cpg_apo``
with the preset's grid 16 and M_u 256),
stepped through the real module and callback hooks: ``training_step`` (the method's forwards and losses,
``publish_step_context`` -> ``BRPGCallback.on_train_step_context``, ``total_loss``), backward, the
optimiser step, ``after_optimizer_step`` (teacher EMA). ``self.log`` is a no-op here (no Trainer loop);
the real run's logging is measured by ``benchmarks/epoch_times.py``. Target: prototype stage <= 1.10x of
mean teacher, so that BRPG stays a small addition to the method it plugs into.

Case 2, ``321 crop``: CPU scale of the paper's setting (ResNet-18, 256-d features, crop 321, batch 2+2).
One full training step = mean-teacher forward passes and losses, the BRPG callback (when on), backward,
SGD step and teacher EMA update. The three variants are measured interleaved (A, B, C, A, B, C, ...) in one
process on the same model and data, and compared by median step time:

- sampling stage: BRPG selects/caps/pushes features into 2 x C banks of V=30000 (float16) each step;
- prototype stage: BRPG adds L_pro (grid 32x32 + 1000 random points per image) and updates prototypes.

Targets, for the same reason: sampling <= 1.10x, prototype stage <= 1.05x of mean teacher alone.
"""

from __future__ import annotations

import statistics
import time

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from benchmarks.common import environment, fmt_times, ratio_line
from brpg_lightning.brpg.callback import BRPGCallback
from brpg_lightning.methods.mean_teacher import MeanTeacher
from brpg_lightning.models.segmentor import Segmentor
from brpg_lightning.train import build, build_module

NUM_CLASSES = 21


def make_module(crop: int) -> MeanTeacher:
    torch.manual_seed(0)
    seg = Segmentor(NUM_CLASSES, encoder_name="resnet18", decoder_channels=64, feature_dim=256)
    optim = OmegaConf.to_container(compose_default("dataset=pascal", "split=92").optim, resolve=True)  # unused: own SGD
    module = MeanTeacher(seg, NUM_CLASSES, optim=optim)
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
    prototype_from = module.current_epoch  # the module's epoch (2): T_S2 at it puts the step in the prototype stage
    cb = BRPGCallback(T_S1=0, T_S2=100 if stage == "sampling" else prototype_from, save_snapshot=False, eta_s=0.0)
    cb.setup(None, module, "fit")
    if stage == "prototype":  # fill the banks from a few real steps, then cluster once (not timed)
        cb.T_S2 = 100
        for _ in range(2):
            with torch.no_grad():
                cb.on_train_step_context(None, module, module.method_step(batch))
        cb.T_S2 = prototype_from
        cb.memory.cluster(0, module.device)
        cb.memory.eta_0 = cb.memory.eta_e = 0.0  # every unlabeled pixel is a candidate: the full M_u points per image
    cb.memory.eta_s = 0.8
    if cb.stage(module.current_epoch) != stage:  # (it once timed the sampling stage under the prototype label)
        raise AssertionError(f"make_callback({stage!r}) built a callback in stage {cb.stage(module.current_epoch)!r}")
    return cb


def step(module: MeanTeacher, opt: torch.optim.Optimizer, batch: dict, cb: BRPGCallback | None) -> None:
    ctx = module.method_step(batch)
    if cb is not None:
        cb.on_train_step_context(None, module, ctx)
    ctx.total_loss().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    module.teacher.update(module.student)


def compose_default(*overrides: str):  # noqa: ANN201 - a DictConfig
    """The default run's composed config (``conf/train.yaml`` with its defaults), outside a Hydra run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from brpg_lightning.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/brpg-bench", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def default_batch(cfg, seed: int = 0) -> dict:  # noqa: ANN001
    """A batch of the default's shapes: 8 + 8 images of the crop, blocky masks of its classes."""
    d = cfg.dataset
    crop, b_l, b_u, c = int(d.crop_size), int(d.batch_size_labeled), int(d.batch_size_unlabeled), int(d.num_classes)
    g = torch.Generator().manual_seed(seed)
    cell = 8
    mask = torch.randint(0, c, (b_l, crop // cell, crop // cell), generator=g)
    mask = mask.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    return {
        "labeled": {"image": torch.randn(b_l, 3, crop, crop, generator=g), "mask": mask},
        "unlabeled": {
            "image": torch.randn(b_u, 3, crop, crop, generator=g),
            "image_strong": torch.randn(b_u, 3, crop, crop, generator=g),
            "valid": torch.ones(b_u, crop, crop, dtype=torch.bool),
        },
    }


class RealStep:
    """One variant of the default run: its own Trainer (callbacks) and epoch, the shared module."""

    def __init__(self, module, callbacks: list, epoch: int, teacher_forward: str | None = None) -> None:  # noqa: ANN001
        self.module, self.epoch = module, epoch
        self.teacher_forward = teacher_forward or module.teacher_forward
        self.trainer = pl.Trainer(
            max_epochs=10, logger=False, enable_checkpointing=False, accelerator="cpu", callbacks=callbacks,
            enable_progress_bar=False, enable_model_summary=False,
        )

    def __call__(self, batch: dict, opt: torch.optim.Optimizer, idx: int) -> None:
        module = self.module
        module.trainer = self.trainer
        module.teacher_forward = self.teacher_forward
        module.teacher.buffers = self.teacher_forward == "weak_only"
        self.trainer.fit_loop.epoch_progress.current.completed = self.epoch
        loss = module.training_step(batch, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.after_optimizer_step()


def run_default(quick: bool) -> tuple[list[str], tuple[float, float]]:
    cfg = compose_default()
    reps = 3 if quick else 15
    torch.manual_seed(0)
    module = build_module(cfg, class_names=list(cfg.dataset.class_names))
    module.log = lambda *a, **k: None  # no Trainer loop: logging is a no-op
    module._total_steps = int(cfg.trainer.max_epochs) * 48
    opt = module.configure_optimizers()["optimizer"]
    batch = default_batch(cfg)
    t_s1, t_s2 = int(cfg.brpg.T_S1), int(cfg.brpg.T_S2)
    sampling_cb = build(cfg.brpg, _convert_="all", save_snapshot=False)
    proto_cb = build(cfg.brpg, _convert_="all", save_snapshot=False)
    for cb in (sampling_cb, proto_cb):
        cb.setup(None, module, "fit")
    variants = {
        # mean teacher without the callback at a sampling epoch: the default's T_S1 is also its first
        # mean-teacher epoch (sup_only_epochs), so an earlier epoch would time a labeled-only step
        "mean teacher": RealStep(module, [], t_s1),
        # the teacher without its train-mode forward on the student's batch (method.teacher_forward=weak_only)
        "mean teacher, weak_only": RealStep(module, [], t_s1, teacher_forward="weak_only"),
        "+ BRPG sampling": RealStep(module, [sampling_cb], t_s1),
        "+ BRPG prototype stage": RealStep(module, [proto_cb], t_s2),
    }
    variants["mean teacher"](batch, opt, 0)  # the teacher is copied from the student at the first MT step
    with torch.no_grad():  # an untrained model is not confident: split the banks at its median confidence
        out = module.student(batch["labeled"]["image"])
        proto_cb.memory.eta_s = float(torch.softmax(out.logits, 1).max(1).values.median())
    for i in range(3):  # banks from real sampling steps, then clustering once (not timed)
        RealStep(module, [proto_cb], t_s1)(default_batch(cfg, seed=1 + i), opt, i)
    proto_cb.memory.cluster(0, module.device)
    proto_cb.memory.eta_0 = proto_cb.memory.eta_e = 0.0  # every unlabeled pixel is a candidate: the full M_u points per image
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in variants.values():  # warm-up
        step(batch, opt, 0)
    for i in range(reps):
        for name, step in variants.items():
            start = time.perf_counter()
            step(batch, opt, i)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    d = cfg.dataset
    lines = [
        f"default run: {cfg.model.encoder_name} deeplabv3plus decoder {cfg.model.decoder_channels}, crop {d.crop_size}, "
        f"batch {d.batch_size_labeled}+{d.batch_size_unlabeled}, {d.num_classes} classes, BRPG {cfg.brpg.name} "
        f"(grid {cfg.brpg.grid}, M_u {cfg.brpg.M_u}); whole training_step + backward + optimiser + "
        f"after_optimizer_step; {reps} interleaved reps",
    ]
    lines += [f"{k:>24s}: median {med[k] * 1e3:.1f} ms/step {fmt_times(v)}" for k, v in times.items()]
    base = med["mean teacher"]
    r_s, r_p = med["+ BRPG sampling"] / base, med["+ BRPG prototype stage"] / base
    r_t = base / med["mean teacher, weak_only"]
    lines.append(f"default run, step time, mean teacher student_batch / weak_only (the teacher's extra train-mode "
                 f"forward): {r_t:.3f}x")
    lines.append(ratio_line("default run, step time, sampling / mean teacher", r_s, "<= 1.10x", r_s <= 1.10))
    lines.append(ratio_line("default run, step time, prototype stage / mean teacher", r_p, "<= 1.10x", r_p <= 1.10))
    return lines, (r_s, r_p)


def run(quick: bool) -> list[str]:
    default_lines, (d_s, d_p) = run_default(quick)
    paper_lines, (p_s, p_p) = run_321(quick)
    return [
        environment(),
        "== case 1: the default run (through the real module and callback hooks)",
        *default_lines,
        "== case 2: 321 crop (compute_step + on_train_step_context, ResNet-18)",
        *paper_lines,
        "== side by side (step time / mean teacher): sampling, prototype stage",
        f"default run  (its crop, 8+8): {d_s:.3f}x, {d_p:.3f}x",
        f"321 crop     (ResNet-18, 2+2): {p_s:.3f}x, {p_p:.3f}x",
    ]


def run_321(quick: bool) -> tuple[list[str], tuple[float, float]]:
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
    lines = [f"crop {crop}, batch 2+2, {NUM_CLASSES} classes, 256-d features, {reps} interleaved reps"]
    lines += [f"{k:>24s}: median {med[k]:.3f} s/step {fmt_times(v)}" for k, v in times.items()]
    base = med["mean teacher"]
    r_s, r_p = med["+ BRPG sampling"] / base, med["+ BRPG prototype stage"] / base
    lines.append(ratio_line("step time, sampling / mean teacher", r_s, "<= 1.10x", r_s <= 1.10))
    lines.append(ratio_line("step time, prototype stage / mean teacher", r_p, "<= 1.05x", r_p <= 1.05))
    return lines, (r_s, r_p)
