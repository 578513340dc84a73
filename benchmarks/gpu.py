"""GPU benchmark in one command: ``python -m benchmarks.gpu [--smoke | --cpu-paper] [--steps N] [--warmup N]``.

Images/s and peak memory of one training step of mean teacher (MT) and of MT + BRPG in its prototype stage
(L_pro on every unlabeled pixel candidate, prototype update), for the paper's DeepLabV3+ ResNet-101
(``model=deeplabv3plus``, crop 513) and UniMatch V2's DPT-DINOv2-S (``model=dpt_dinov2_small``, crop 518), under
``16-mixed`` and ``bf16-mixed`` autocast, side by side in one process; prints BRPG / MT per model and precision.

A step is what training runs (as ``bench_step_overhead.py``): the method's forwards and losses
(``method_step``), ``BRPGCallback.on_train_step_context`` (when on), backward (a ``GradScaler`` for
``16-mixed``), the optimiser step and the teacher EMA. MT and MT + BRPG steps alternate on the same model and
batch, so a slow spell hits both alike; medians over the timed steps. Images/s counts labeled + unlabeled
images. Peak memory (``torch.cuda.max_memory_allocated``, reset before each step): MT's from its steps before
the BRPG callback exists, BRPG's includes its banks (2 x C x V, float16). Random weights (no download): step
time and memory do not depend on the values.

Modes: default, the GPU at the paper's per-GPU batch (4 + 4, as the official BRPG and UniMatch V2 runs);
``--cpu-paper``: the CPU, fp32, R101 at 513 with batch 1 + 1 (the ratio the paper's network has; minutes);
``--smoke``: tiny models and crops on the CPU, fp32, in seconds (tests/benchmarks/test_gpu.py runs it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from benchmarks.bench_step_overhead import NUM_CLASSES, compose_default, make_batch
from benchmarks.common import environment
from brpg_lightning.brpg.callback import BRPGCallback
from brpg_lightning.methods.mean_teacher import MeanTeacher
from brpg_lightning.train import build

PRECISIONS = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16, "32": None}


@dataclass(frozen=True)
class Case:
    """One network: its ``conf/model`` name, crop, ``model.`` overrides (tiny sizes) and batch per side."""

    label: str
    model: str
    crop: int
    batch: int
    overrides: tuple[str, ...] = ()
    bank: int = 30000  # V, features per class and bank (the paper's)


PAPER = (Case("DeepLabV3+ R101", "deeplabv3plus", 513, 4), Case("DPT-DINOv2-S", "dpt_dinov2_small", 518, 4))
CPU_PAPER = (Case("DeepLabV3+ R101", "deeplabv3plus", 513, 1),)
SMOKE = (
    Case("DeepLabV3+ small", "deeplabv3plus_small", 64, 1, bank=500),
    Case("DPT-DINOv2 tiny", "dpt_dinov2_small", 56, 1, (
        "model.decoder_intermediate_channels=[8,16,32,32]", "model.decoder_fusion_channels=16",
        "++model.embed_dim=48", "++model.num_heads=2", "++model.img_size=56"), bank=500),
)


def make_module(case: Case, device: torch.device) -> MeanTeacher:
    """The case's segmentor as ``conf/model/<name>.yaml`` builds it (random weights), in a mean teacher whose
    teacher is active (as bench_step_overhead.make_module)."""
    import pytorch_lightning as pl

    cfg = compose_default(f"model={case.model}", "dataset=pascal", "model.encoder_weights=null",
                          "model.weights_path=null", *case.overrides)
    torch.manual_seed(0)
    seg = build(cfg.model)
    module = MeanTeacher(seg, NUM_CLASSES, optim=OmegaConf.to_container(cfg.optim, resolve=True))
    trainer = pl.Trainer(max_epochs=10, logger=False, enable_checkpointing=False, accelerator="cpu")
    module.trainer = trainer
    trainer.fit_loop.epoch_progress.current.completed = 2  # teacher active, unlabeled branch on
    module._total_steps = 1000
    module.log = lambda *a, **k: None
    module.teacher.copy_from(module.student)
    module.teacher_ready.fill_(True)
    return module.to(device)


def prototype_callback(module: MeanTeacher, batch: dict, bank: int) -> BRPGCallback:
    """BRPG (paper defaults, ``V = bank``) in its prototype stage: banks filled from 2 steps and clustered once
    (not timed); every unlabeled pixel a candidate, so L_pro reads the full M_u points per image
    (bench_step_overhead.make_callback)."""
    epoch = module.current_epoch
    cb = BRPGCallback(T_S1=0, T_S2=epoch + 1, save_snapshot=False, eta_s=0.0, V=bank)
    cb.setup(None, module, "fit")
    for _ in range(2):  # sampling stage at this epoch
        with torch.no_grad():
            cb.on_train_step_context(None, module, module.method_step(batch))
    cb.T_S2 = epoch  # prototype stage from this epoch on (bench_step_overhead's T_S2 = 3 at epoch 2 stays sampling)
    cb.memory.cluster(0, module.device)
    cb.memory.eta_0 = cb.memory.eta_e = 0.0
    cb.memory.eta_s = 0.8
    return cb


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


class Stepper:
    """One training step under a precision: autocast forward + callback, scaled backward for float16."""

    def __init__(self, module: MeanTeacher, precision: str, device: torch.device) -> None:
        self.module, self.device, self.dtype = module, device, PRECISIONS[precision]
        self.opt = torch.optim.SGD(module.student.parameters(), lr=1e-6, momentum=0.9)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)

    def __call__(self, batch: dict, cb: BRPGCallback | None) -> tuple[float, int]:
        """Seconds and peak bytes (CUDA; 0 on the CPU) of one step."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            ctx = self.module.method_step(batch)
            if cb is not None:
                cb.on_train_step_context(None, self.module, ctx)
            loss = ctx.total_loss()
        self.last_losses = sorted(ctx.losses)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.module.teacher.update(self.module.student)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else 0


def measure(case: Case, precision: str, device: torch.device, warmup: int, steps: int) -> dict:
    """MT then MT + BRPG steps, interleaved; medians, images/s, peak memory."""
    module = make_module(case, device)
    batch = to_device(make_batch(case.crop, case.batch), device)
    stepper = Stepper(module, precision, device)
    mt_peak = 0
    for _ in range(max(warmup, 1)):  # MT alone first: its memory without the BRPG banks
        mt_peak = max(mt_peak, stepper(batch, None)[1])
    with torch.autocast(device.type, dtype=stepper.dtype or torch.float32, enabled=stepper.dtype is not None):
        cb = prototype_callback(module, batch, case.bank)
    for _ in range(warmup):
        stepper(batch, cb)
    brpg_losses = stepper.last_losses
    if "L_pro" not in brpg_losses:
        raise RuntimeError(f"BRPG is not in its prototype stage: the step's losses are {brpg_losses}")
    times: dict[str, list[float]] = {"MT": [], "MT+BRPG": []}
    peak = {"MT": mt_peak, "MT+BRPG": 0}
    for _ in range(steps):
        for name, callback in (("MT", None), ("MT+BRPG", cb)):
            seconds, mem = stepper(batch, callback)
            times[name].append(seconds)
            peak[name] = max(peak[name], mem)
    med = {k: statistics.median(v) for k, v in times.items()}
    images = 2 * case.batch
    del module, stepper, cb
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"case": case, "precision": precision, "median_s": med, "times": times,
            "images_per_s": {k: images / v for k, v in med.items()}, "peak_bytes": peak,
            "ratio": med["MT+BRPG"] / med["MT"], "brpg_losses": brpg_losses}


def table(rows: list[dict], device: torch.device) -> list[str]:
    gib = 2.0**30
    lines = [f"{'model':<18} {'crop':>4} {'batch':>5} {'precision':<10} {'MT img/s':>9} {'BRPG img/s':>10} "
             f"{'MT s/step':>9} {'BRPG s/step':>11} {'MT peak':>9} {'BRPG peak':>9} {'BRPG/MT':>7}"]
    for r in rows:
        c, m, ips, pk = r["case"], r["median_s"], r["images_per_s"], r["peak_bytes"]
        mem = (f"{pk['MT'] / gib:8.2f}G {pk['MT+BRPG'] / gib:8.2f}G" if device.type == "cuda"
               else f"{'-':>9} {'-':>9}")
        lines.append(f"{c.label:<18} {c.crop:>4} {c.batch:>2}+{c.batch:<2} {r['precision']:<10} {ips['MT']:9.2f} "
                     f"{ips['MT+BRPG']:10.2f} {m['MT']:9.3f} {m['MT+BRPG']:11.3f} {mem} {r['ratio']:6.3f}x")
    return lines


def run(mode: str, warmup: int | None = None, steps: int | None = None) -> tuple[list[str], list[dict]]:
    """Measure every case x precision of ``mode`` (``gpu``, ``cpu-paper``, ``smoke``); lines and rows."""
    if mode == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device; use --cpu-paper (paper scale on the CPU) or --smoke")
        device, cases, precisions = torch.device("cuda"), PAPER, ("16-mixed", "bf16-mixed")
        warmup, steps = warmup or 3, steps or 10
        torch.backends.cudnn.benchmark = True
    else:
        device, precisions = torch.device("cpu"), ("32",)
        cases = CPU_PAPER if mode == "cpu-paper" else SMOKE
        warmup = warmup if warmup is not None else (2 if mode == "cpu-paper" else 1)
        steps = steps or (3 if mode == "cpu-paper" else 1)
    rows = [measure(c, p, device, warmup, steps) for c in cases for p in precisions]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [environment(), f"device: {name}; {warmup} warm-up steps, then {steps} timed steps per variant, "
             f"MT and MT+BRPG (prototype stage) interleaved; images/s = (labeled + unlabeled) / median step",
             *table(rows, device), "BRPG / MT step time:"]
    lines += [f"  {r['case'].label}, {r['precision']}: {r['ratio']:.3f}x "
              f"(times MT {', '.join(f'{t:.3f}' for t in r['times']['MT'])}; "
              f"MT+BRPG {', '.join(f'{t:.3f}' for t in r['times']['MT+BRPG'])} s)" for r in rows]
    return lines, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", "--cpu-tiny", dest="mode", action="store_const", const="smoke",
                       help="tiny sizes on the CPU, fp32 (seconds)")
    group.add_argument("--cpu-paper", dest="mode", action="store_const", const="cpu-paper",
                       help="R101 at 513, batch 1 + 1, on the CPU, fp32 (minutes)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    args = parser.parse_args(argv)
    lines, _ = run(args.mode or "gpu", args.warmup, args.steps)
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
