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

import brpg_lightning.brpg.prototype_memory as pm
from brpg_lightning.brpg.callback import brpg_callbacks
from brpg_lightning.brpg.prototype_memory import PrototypeMemory


def memory_state(memory: PrototypeMemory) -> dict[str, Any]:
    """The memory's tensors: banks (features, labels, fill) while sampling, prototypes after clustering."""
    out: dict[str, Any] = {}
    for name in ("bank_high", "bank_low"):
        bank = getattr(memory, name)
        if bank is not None:
            out[name] = {k: v.detach().cpu().clone() for k, v in bank.state_dict().items()}
    for name in ("prototypes", "proto_mask", "thresholds"):
        t = getattr(memory, name)
        if t is not None:
            out[name] = t.detach().cpu().clone()
    return out


def brpg_state(trainer: pl.Trainer, clustered: bool = False) -> dict[str, Any]:
    """:func:`memory_state` of the trainer's BRPG (with ``last_stats`` when ``clustered``); with several networks
    (CPS) one such dict per network name."""
    def one(memory: PrototypeMemory) -> dict[str, Any]:
        return {**memory_state(memory), **({"last_stats": dict(memory.last_stats)} if clustered else {})}

    cbs = brpg_callbacks(trainer)
    if len(cbs) == 1:
        return one(next(iter(cbs.values())).memory)
    return {network: one(cb.memory) for network, cb in cbs.items()}


class RankStateDump(pl.Callback):
    """Write ``<dirpath>/rank<r>_<tag>.pt`` on every rank.

    Tags: ``epoch<e>`` at each training epoch end, ``clustered`` after the first prototype step (the
    prototypes right after K-Means, before EMA updates drift them), ``student`` at the end of fit, and there
    too ``pushes`` (this rank's own samples of every step, before the gather: ``[(bank, feats, labels)]``) and
    ``ema`` (every prototype EMA update: the prototypes before and after, this rank's assignment sums and
    counts before the all-reduce and the reduced ones the update used). The last two record what the BRPG code
    does by wrapping its functions in this process: single-BRPG runs only.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.clustered = False
        self.pushes: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.ema: list[dict[str, Any]] = []
        self._local: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cbs = brpg_callbacks(trainer)
        if len(cbs) != 1:
            return
        memory = next(iter(cbs.values())).memory
        push, stats, ema = PrototypeMemory._push, pm.assignment_stats, pm.ema_update

        def recording_push(bank, conf_bank, feats, labels, conf):  # noqa: ANN001, ANN202
            name = "bank_high" if bank is memory.bank_high else "bank_low"
            self.pushes.append((name, feats.detach().cpu().clone(), labels.detach().cpu().clone()))
            return push(bank, conf_bank, feats, labels, conf)

        def recording_stats(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            s, n = stats(*args, **kwargs)
            self._local.append((s.detach().cpu().clone(), n.detach().cpu().clone()))
            return s, n

        def recording_ema(prototypes, sums, counts, alpha=0.99):  # noqa: ANN001, ANN202
            local_sums, local_counts = self._local[0]
            for s, n in self._local[1:]:
                local_sums, local_counts = local_sums + s, local_counts + n
            self._local.clear()
            after = ema(prototypes, sums, counts, alpha)
            self.ema.append({"before": prototypes.detach().cpu().clone(), "after": after.detach().cpu().clone(),
                             "local_sums": local_sums, "local_counts": local_counts, "alpha": float(alpha),
                             "sums": sums.detach().cpu().clone(), "counts": counts.detach().cpu().clone()})
            return after

        memory._push = recording_push
        pm.assignment_stats, pm.ema_update = recording_stats, recording_ema

    def _dump(self, trainer: pl.Trainer, tag: str, payload: dict[str, Any]) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(payload, self.dirpath / f"rank{trainer.global_rank}_{tag}.pt")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        cbs = brpg_callbacks(trainer)
        if not cbs or self.clustered or any(cb.memory.prototypes is None for cb in cbs.values()):
            return
        self.clustered = True
        self._dump(trainer, "clustered", brpg_state(trainer, clustered=True))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = brpg_state(trainer)
        state["batches"] = int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
        state["world_size"] = int(trainer.world_size)
        state["loader_batches"] = {k: len(v) for k, v in trainer.train_dataloader.items()}  # per rank, unlimited
        miou = trainer.callback_metrics.get("val/mIoU")
        state["val_mIoU"] = None if miou is None else float(miou)
        self._dump(trainer, f"epoch{trainer.current_epoch}", state)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        self._dump(trainer, "student", weights)
        self._dump(trainer, "pushes", {"pushes": self.pushes})
        self._dump(trainer, "ema", {"ema": self.ema})


class BadFileOnRank(pl.Callback):
    """A bad data file met by one rank (``rank``; None: every rank) at its training batch ``batch``, as a loader
    raises it (:class:`~brpg_lightning.data.datasets.common.DataItemError`): the other ranks are then waiting
    in a collective. Deterministic where a real bad file lands on whichever rank the sampler gives it to."""

    def __init__(self, rank: int | None = 1, batch: int = 1) -> None:
        self.rank, self.batch = rank, int(batch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        from brpg_lightning.data.datasets.common import DataItemError

        if batch_idx == self.batch and (self.rank is None or trainer.global_rank == self.rank):
            raise DataItemError("mask 'labeled/masks/x.png' has values [7]; expected class ids 0..6 or 255")
