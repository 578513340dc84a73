"""Test-only callback that kills its own process with SIGKILL at a chosen point (fault injection); attached to a
CLI run by ``+callbacks.kill._target_=tests.app.fault_hooks.KillAt +callbacks.kill.point=...``."""

from __future__ import annotations

import io
import os
import signal
from typing import Any

import pytorch_lightning as pl
import torch

POINTS = ("train_step", "validation", "clustering", "checkpoint_write")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(pl.Callback):
    """SIGKILL at ``point``: ``train_step`` (inside the training step whose ``global_step`` is ``step``, after the
    forward pass), ``validation`` (after the first validation batch of epoch ``epoch``), ``clustering`` (inside
    BRPG's clustering at T_S2, after the K-Means, before the prototypes are stored), ``checkpoint_write`` (half-way
    through writing the first checkpoint saved at ``global_step == step``)."""

    def __init__(self, point: str, step: int = -1, epoch: int = -1) -> None:
        if point not in POINTS:
            raise ValueError(f"point={point!r}; expected one of {POINTS}")
        self.point, self.step, self.epoch = point, int(step), int(epoch)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.point == "clustering":
            import brpg_lightning.brpg.prototype_memory as memory

            original = memory.kmeans

            def kmeans_then_die(*args: Any, **kwargs: Any) -> Any:
                original(*args, **kwargs)
                _die()

            memory.kmeans = kmeans_then_die
        elif self.point == "checkpoint_write":
            import brpg_lightning.plugins as plugins

            original_save = torch.save

            def save_half(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
                if trainer.global_step != self.step:
                    return original_save(obj, f, *args, **kwargs)
                buffer = io.BytesIO()
                original_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                _die()

            plugins.torch = type("TorchWithHalfSave", (), {"save": staticmethod(save_half)})

    def on_train_step_context(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: Any) -> None:
        if self.point == "train_step" and ctx.global_step == self.step:
            _die()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.point == "validation" and trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            _die()
