"""BRPG as a Lightning Callback: when each part of Algorithm 1 (lines 8-24) runs, and what gets logged.

The state and the operations live in :class:`~brpg_lightning.brpg.prototype_memory.PrototypeMemory`
(``callback.memory``); the reports in :mod:`brpg_lightning.brpg.report`. The callback reads the step seam
(:class:`~brpg_lightning.methods.context.TrainStepContext`), never the method's attributes, and adds ``L_pro``
with ``ctx.add_loss``. Stages by epoch ``e`` (0-based, an epoch = one pass over the unlabeled set):

- ``e < T_S1``: nothing (pretraining).
- ``T_S1 <= e < T_S2``: sampling into per-class FIFO banks (Eq. 8-9).
- first step of ``e >= T_S2``: APO counts (Eq. 11-14) and K-Means prototypes (Eq. 10); the snapshot.
- ``e >= T_S2``: ``L = L_s + lambda_u L_u + lambda_pro L_pro`` (Eq. 15-21) and prototype EMA (Eq. 22).

Logged under ``brpg/`` (``brpg/<network>/`` for a network other than ``student``): per step what the memory
returns (``sampled_high``, ``L_pro_l``, ``L_pro_u``, ``eta_t``, ``u_pass_eta_t``), per epoch
:meth:`BRPGCallback.epoch_scalars`. The checkpoint holds the memory's ``state_dict`` plus the epoch and loads
with ``torch.load(weights_only=True)``. Other callbacks find every network's instance with :func:`brpg_callbacks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from brpg_lightning.brpg import report
from brpg_lightning.brpg.prototype_memory import PrototypeMemory, Scalars
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.context import TrainStepContext

DEFAULT_NETWORK = "student"
COUNTS = frozenset({"sampled_high"})
"""Per-step scalars that are counts: their epoch aggregate is the sum over steps and ranks."""
PER_STEP_ONLY = frozenset({"eta_t"})
"""Per-step scalars with no epoch aggregate (the same on every rank; ``eta_t_epoch`` comes from the report)."""


class BRPGCallback(pl.Callback):
    """Boundary-Refined Prototype Generation (paper Sec. 3.4-3.5, Algorithm 1) on one network of a method.

    Args:
        name: variant name for logs (``cpg_apo``, ``cpg``, ``plain``).
        T_S1, T_S2: sampling epochs ``[T_S1, T_S2)``; clustering at the first step of ``T_S2`` (Sec. 4.1.5).
        save_snapshot: at ``T_S2`` write ``<run>/brpg/snapshot.pt`` (bank sample + prototypes) for notebooks;
            only then does the memory keep (gather, save) each bank feature's confidence.
        snapshot_per_class: features per class and bank in the snapshot.
        network: the method network this instance serves (``TrainStepContext.network``); other contexts are
            ignored. CPS gets one instance per network: own state key, ``brpg/<network>/`` log keys and
            ``snapshot_<network>.pt``.
        **memory_options: the other ``brpg.*`` keys, :class:`~brpg_lightning.brpg.prototype_memory.PrototypeMemory`'s
            keyword arguments (documented there, with the paper's equations and defaults).
    """

    def __init__(
        self,
        name: str = "cpg_apo",
        T_S1: int = 1,
        T_S2: int = 2,
        save_snapshot: bool = True,
        snapshot_per_class: int = 500,
        network: str = DEFAULT_NETWORK,
        **memory_options: Any,
    ) -> None:
        super().__init__()
        if not 0 <= T_S1 < T_S2:
            raise BRPGInputError(f"brpg.T_S1={T_S1}, brpg.T_S2={T_S2}; expected 0 <= T_S1 < T_S2")
        self.name, self.T_S1, self.T_S2 = name, int(T_S1), int(T_S2)
        self.save_snapshot, self.snapshot_per_class = bool(save_snapshot), int(snapshot_per_class)
        self.network = network
        self.epoch = 0  # current epoch as last seen (statistics)
        # every other key is the memory's, with its paper default there: one signature, documented once
        self.memory = PrototypeMemory(**memory_options, keep_confidence=self.save_snapshot)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        max_epochs = None if trainer is None else trainer.max_epochs
        self.memory.setup(int(pl_module.num_classes), max_epochs)

    def stage(self, epoch: int) -> str:
        """``pretrain``, ``sampling`` or ``prototype`` for an epoch (:data:`brpg_lightning.brpg.report.STAGES`)."""
        if epoch < self.T_S1:
            return "pretrain"
        return "sampling" if epoch < self.T_S2 else "prototype"

    @property
    def state_key(self) -> str:
        """Checkpoint key: the class name, plus the network when not the default (two CPS instances)."""
        if self.network == DEFAULT_NETWORK:
            return super().state_key
        return self._generate_state_key(network=self.network)

    @property
    def log_prefix(self) -> str:
        """``brpg/``, or ``brpg/<network>/`` for a network other than the default (one BRPG per CPS network)."""
        return "brpg/" if self.network == DEFAULT_NETWORK else f"brpg/{self.network}/"

    def _log(self, pl_module: pl.LightningModule, scalars: Scalars) -> None:
        """Per-step scalars (rank 0's at each step) and their epoch aggregates over all ranks (``<key>_epoch``,
        :meth:`SegmentationModule.log_train`): counts are summed, the rest averaged; ``eta_t`` is a schedule,
        the same on every rank, and has its epoch value in :meth:`epoch_scalars` already."""
        log_train = getattr(pl_module, "log_train", None)
        for key, (value, batch_size) in scalars.items():
            if log_train is None or key in PER_STEP_ONLY:
                pl_module.log(self.log_prefix + key, value, batch_size=batch_size)
            else:
                log_train(self.log_prefix + key, value, batch_size, reduce="sum" if key in COUNTS else "mean")

    # ------------------------------------------------------------------ hooks
    def on_train_step_context(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: TrainStepContext) -> None:
        if ctx.network != self.network:
            return
        self.epoch = int(ctx.epoch)
        stage = self.stage(ctx.epoch)
        if stage == "sampling":
            self._log(pl_module, self.memory.sample(ctx))
        elif stage == "prototype":
            if self.memory.prototypes is None:
                self._cluster(trainer, pl_module, ctx.global_step)
            step = self.memory.prototype_step(ctx)
            if step.late_classes:
                rank_zero_info(
                    f"BRPG[{self.name}]: classes {step.late_classes} got their first prototypes at step {ctx.global_step}"
                )
            ctx.add_loss("L_pro", step.loss)
            self._log(pl_module, step.scalars)

    def _cluster(self, trainer: pl.Trainer, pl_module: pl.LightningModule, global_step: int) -> None:
        """Clustering at the first prototype step; its warnings and summary; the snapshot on rank 0."""
        with torch.autocast(pl_module.device.type, enabled=False):  # CPU bf16 autocast rejects float16 banks
            clustering = self.memory.cluster(global_step, pl_module.device)
            for line in clustering.warnings:
                rank_zero_warn(line)
            rank_zero_info(f"BRPG[{self.name}]: {clustering.summary()}")
            if self.save_snapshot and trainer.is_global_zero:
                suffix = "" if self.network == DEFAULT_NETWORK else f"_{self.network}"
                snap = report.snapshot(self.memory, clustering, self.snapshot_per_class, self.T_S2)
                path = report.write_snapshot(Path(trainer.default_root_dir) / "brpg" / f"snapshot{suffix}.pt", snap)
                rank_zero_info(f"BRPG: snapshot written to {path}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch = int(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log :meth:`epoch_scalars` (every epoch, every stage)."""
        self.epoch = int(trainer.current_epoch)
        for key, value in self.epoch_scalars().items():
            pl_module.log(key, value, batch_size=1)

    # ------------------------------------------------------------------ reports
    def statistics(self, epoch: int | None = None) -> dict[str, Any]:
        """:func:`brpg_lightning.brpg.report.statistics` at ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        return report.statistics(self.memory, self.stage(epoch), epoch)

    def epoch_scalars(self, epoch: int | None = None) -> dict[str, float]:
        """The scalars of :meth:`statistics` under the keys logged at every epoch end
        (:func:`brpg_lightning.brpg.report.epoch_scalars` with :attr:`log_prefix`)."""
        return report.epoch_scalars(self.statistics(epoch), self.log_prefix)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The memory's ``state_dict`` (plain tensors and numbers) plus the epoch."""
        return {**self.memory.state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.memory.load_state_dict(state_dict)
        self.epoch = int(state_dict.get("epoch") or 0)


def brpg_callbacks(trainer: pl.Trainer) -> dict[str, BRPGCallback]:
    """Every network's BRPG callback of ``trainer``, ``{network: callback}`` in callback order (CPS: both
    networks; empty without BRPG). The one way other callbacks read BRPG: ``stage``, ``T_S1``/``T_S2``,
    ``statistics()`` and ``memory`` of each."""
    return {cb.network: cb for cb in trainer.callbacks if isinstance(cb, BRPGCallback)}
