"""Exact resume and pre-emption: RNG states in every checkpoint; a checkpoint on SIGTERM.

Lightning restores the weights (student and the EMA teacher with its ``steps`` buffer), optimiser, LR
scheduler, loop position and every callback's ``state_dict`` (BRPG stage, banks, prototypes, thresholds).
It does not restore the random number generators; :class:`RNGStateCheckpoint` adds them, so a run resumed
from an epoch-boundary checkpoint continues with the same random stream: the same batch order (the
samplers draw from torch's global generator), augmentations, CutMix boxes and bank subsampling.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class RNGStateCheckpoint(pl.Callback):
    """Save torch (CPU and CUDA), numpy and python RNG states in checkpoints; restore them on load.

    The states are captured when the checkpoint is written (Lightning writes epoch-end checkpoints after
    validation, the last thing that draws random numbers in an epoch) and restored when the checkpoint is
    loaded, before the training dataloader is iterated again. Under DDP the checkpoint holds rank 0's
    states and every rank restores them.

    Hand-written because Lightning's own RNG capture (``_collect_rng_states``) is applied only to Fabric
    checkpoints, not to ``Trainer`` checkpoints.
    """

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": repr(random.getstate()),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        n = state_dict["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate(_literal_state(state_dict["python"]))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _literal_state(text: str) -> tuple:
    import ast

    return ast.literal_eval(text)


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (cluster pre-emption, ``scancel``, ``kill``) or Ctrl-C (SIGINT) write ``<dirpath>/<filename>``
    and exit (143 after SIGTERM, 130 after SIGINT).

    Lightning's signal connector turns SIGTERM into a :class:`SIGTERMException` at the next batch boundary
    (broadcast to every DDP rank); this callback then saves a full checkpoint (mid-epoch loop position
    included) before the process exits with status 143 (``brpg_lightning.cli``). Resume with
    ``ckpt_path=<dirpath>/<filename>``. A mid-epoch resume restarts the epoch's data stream (the loaders are
    not stateful), so it is resumable but not bit-identical; epoch-boundary checkpoints (``last.ckpt``)
    resume exactly. Under SLURM, Lightning's ``SLURMEnvironment`` additionally requeues the job on its
    requeue signal (SIGUSR1 by default, ``#SBATCH --signal=SIGUSR1@90``) with an ``hpc_ckpt_*.ckpt``.

    Args:
        dirpath: folder of the checkpoint (the run's ``checkpoints/``).
        filename: file name (``preempted.ckpt``).
    """

    def __init__(self, dirpath: str, filename: str = "preempted.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.signal_name = "SIGTERM"
        self._previous_sigint: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Ctrl-C (SIGINT) is taken like SIGTERM: Lightning's own handling stops mid-step and exits 1 without a
        checkpoint, losing the epoch. A second Ctrl-C stops at once (KeyboardInterrupt), for a step that hangs."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def on_sigint(signum: int, frame: Any) -> None:
            connector = trainer._signal_connector
            if connector.received_sigterm:
                raise KeyboardInterrupt
            self.signal_name = "SIGINT"
            rank_zero_info("interrupted (SIGINT): checkpointing at the next batch boundary; Ctrl-C again to stop now")
            connector.received_sigterm = True  # the flag Lightning's loops check at each batch boundary

        self._previous_sigint = signal.signal(signal.SIGINT, on_sigint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            import signal

            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        trainer.save_checkpoint(self.path)
        what = "interrupted (SIGINT)" if self.signal_name == "SIGINT" else "pre-empted (SIGTERM)"
        # the CLI's last line repeats the resume command and picks the exit status from the signal
        exception.signal_name = self.signal_name  # type: ignore[attr-defined]
        exception.checkpoint = self.path  # type: ignore[attr-defined]
        rank_zero_info(
            f"{what} at epoch {trainer.current_epoch}, step {trainer.global_step}: checkpoint "
            f"{self.path}; resume with ckpt_path={self.path}"
        )


class FinalCheckpoint(pl.Callback):
    """At the end of ``fit``, write ``<dirpath>/<filename>`` unless a checkpoint of the final step exists already.

    The epoch-end checkpoints miss a run that ends mid-epoch (``trainer.max_steps``, a time limit, early
    stopping checked on steps): its last steps would be lost. Not written when ``fit`` ends by an exception
    (a non-finite loss, SIGTERM), so the checkpoints of the last good state stay as they were. ``path`` is the
    file written, None when the final step was already saved (or no step ran).

    Args:
        dirpath: folder of the checkpoint (the run's ``checkpoints/``).
        filename: file name (``last.ckpt``: the run's last state, as the per-epoch ``last.ckpt``).
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.target = Path(dirpath) / filename
        self.path: Path | None = None
        self._saved_step: int | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._saved_step = int(checkpoint.get("global_step", trainer.global_step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 or self._saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.target)  # every rank: Lightning writes on rank 0 and synchronises
        self.path = self.target
        rank_zero_info(f"final checkpoint (epoch {trainer.current_epoch}, step {trainer.global_step}): {self.target}")
