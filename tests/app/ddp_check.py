"""Dump every rank's BRPG state (banks, prototypes, thresholds) so a test can compare ranks.

Test-only: ``tests/app/test_ddp.py`` attaches it to the spawned ``python -m brpg_lightning`` through
``+callbacks.rank_state._target_=tests.app.ddp_check.RankStateDump``, with the repository root on the
child's ``PYTHONPATH`` so that ``tests`` is importable there. It costs a ``torch.save`` per dump.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from brpg_lightning.callbacks.progress import brpg_callback


def brpg_state(cb: Any) -> dict[str, Any]:
    """The callback's tensors: banks (features, labels, fill) while sampling, prototypes after clustering."""
    out: dict[str, Any] = {}
    for name in ("bank_high", "bank_low"):
        bank = getattr(cb, name, None)
        if bank is not None:
            out[name] = {k: v.detach().cpu().clone() for k, v in bank.state_dict().items()}
    for name in ("prototypes", "proto_mask", "thresholds"):
        t = getattr(cb, name, None)
        if t is not None:
            out[name] = t.detach().cpu().clone()
    return out


class RankStateDump(pl.Callback):
    """Write ``<dirpath>/rank<r>_<tag>.pt`` on every rank.

    Tags: ``epoch<e>`` at each training epoch end, ``clustered`` after the first prototype step (the
    prototypes right after K-Means, before EMA updates drift them), ``student`` at the end of fit.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.clustered = False

    def _dump(self, trainer: pl.Trainer, tag: str, payload: dict[str, Any]) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(payload, self.dirpath / f"rank{trainer.global_rank}_{tag}.pt")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        cb = brpg_callback(trainer)
        if cb is None or self.clustered or getattr(cb, "prototypes", None) is None:
            return
        self.clustered = True
        self._dump(trainer, "clustered", {**brpg_state(cb), "last_stats": dict(getattr(cb, "last_stats", {}))})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = brpg_callback(trainer)
        state = brpg_state(cb) if cb is not None else {}
        state["batches"] = int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
        state["world_size"] = int(trainer.world_size)
        state["loader_batches"] = {k: len(v) for k, v in trainer.train_dataloader.items()}  # per rank, unlimited
        miou = trainer.callback_metrics.get("val/mIoU")
        state["val_mIoU"] = None if miou is None else float(miou)
        self._dump(trainer, f"epoch{trainer.current_epoch}", state)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        self._dump(trainer, "student", weights)
