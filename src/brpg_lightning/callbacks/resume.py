"""Exact resume and pre-emption: RNG states and the loaders' positions in every checkpoint; a checkpoint on
SIGTERM.

Lightning restores the weights (student and the EMA teacher with its ``steps`` buffer), optimiser, LR
scheduler, loop position and every callback's ``state_dict`` (BRPG stage, banks, prototypes, thresholds).
It does not restore the random number generators; :class:`RNGStateCheckpoint` adds them. The training data
depends on no generator's history (``data.resumable``: orders and augmentations are functions of the seed,
epoch and item) and the loaders' positions travel in the checkpoint (:class:`LoaderPosition` loads them), so
the saved generator state serves the training step alone (CutMix boxes, dropout, bank subsampling): a run
resumed from any checkpoint, epoch boundary or mid-epoch (``step_checkpoint``, ``preempted.ckpt``), continues
exactly as the uninterrupted run.
"""

from __future__ import annotations

import csv
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


class LoaderPosition(pl.Callback):
    """Resume the training loaders at the position a mid-epoch checkpoint saved (``data.resumable``).

    Lightning saves the stateful loaders' ``state_dict`` in every checkpoint and loads them when it builds the
    training loaders after the restore. Here the loaders are built earlier, before the restore: the poly schedule
    asks ``trainer.estimated_stepping_batches`` in ``configure_optimizers``, which sets the loaders up, so
    Lightning never loads the saved positions (and a resumed epoch would restart at its first batch). This
    callback loads them at ``on_train_start``, after the restore and before the first batch, and renews the
    data iterator so that loader workers start from the loaded position.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop
        states, loader = loop._combined_loader_states_to_load, loop._combined_loader
        if not states or loader is None:
            return
        loader._load_state_dicts(states)
        loop._combined_loader_states_to_load = []
        if loop._data_fetcher is not None:
            iter(loop._data_fetcher)


class CsvLogPosition(pl.Callback):
    """The CSV log (``csv/metrics.csv``) of a resumed run continues where its checkpoint left it: no step twice,
    none of the earlier rows lost (Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts).

    Every checkpoint flushes the CSV loggers and records how many rows their file holds; resuming in the same run
    directory cuts the rows written after that point (by the interrupted process: its steps are trained and logged
    again), before anything new is logged. Rows a step logs after its own checkpoint was written (the step of a
    step-interval checkpoint) are cut with them and not logged again.
    """

    KEY = "csv_log_rows"

    def __init__(self) -> None:
        self.previous: dict[str, list[str]] = {}

    def capture(self, loggers: list[Any]) -> None:
        """Read the CSV loggers' files before ``fit``: Lightning creates the writers (deleting the files) before
        any callback hook runs. ``train`` calls it when resuming."""
        from pytorch_lightning.loggers import CSVLogger

        for logger in loggers:
            path = Path(logger.log_dir) / "metrics.csv"  # log_dir does not create the writer
            if isinstance(logger, CSVLogger) and path.is_file():
                self.previous[str(path.resolve())] = path.read_text().splitlines(keepends=True)

    @staticmethod
    def _csv_loggers(trainer: pl.Trainer) -> list[Any]:
        from pytorch_lightning.loggers import CSVLogger

        return [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not trainer.is_global_zero:  # only rank 0 has the CSV writer (the others' experiment is a stand-in)
            return
        rows = {}
        for logger in self._csv_loggers(trainer):
            logger.save()
            path = Path(logger.experiment.metrics_file_path)
            rows[str(path.resolve())] = _csv_rows(path)[1] if path.is_file() else 0
        checkpoint[self.KEY] = rows

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(self.KEY) or {}
        if not trainer.is_global_zero:
            return
        for logger in self._csv_loggers(trainer):
            path = Path(logger.experiment.metrics_file_path)
            keep, lines = saved.get(str(path.resolve())), self.previous.pop(str(path.resolve()), None)
            if keep is None or lines is None:
                continue  # another run directory: nothing of this checkpoint's run to keep
            count, writer = max(len(lines) - 1, 0), logger.experiment
            path.write_text("".join(lines[: 1 + min(keep, count)]))
            if count > keep:
                rank_zero_info(f"{path}: cut {count - keep} rows logged after the checkpoint (they are logged again)")
            # the writer knows the file's columns: its header rewrite (on a new key) would drop the others' values
            header = next(csv.reader(lines[:1]), []) if lines else []
            writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))


def _csv_rows(path: Path) -> tuple[list[str], int]:
    """The file's lines (header first) and its number of data rows (one line each: Lightning writes numbers)."""
    lines = path.read_text().splitlines(keepends=True)
    return lines, max(len(lines) - 1, 0)


def _literal_state(text: str) -> tuple:
    import ast

    return ast.literal_eval(text)


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (cluster pre-emption, ``scancel``, ``kill``) or Ctrl-C (SIGINT) write ``<dirpath>/<filename>``
    and exit (143 after SIGTERM, 130 after SIGINT).

    Lightning's signal connector turns SIGTERM into a :class:`SIGTERMException` at the next batch boundary
    (broadcast to every DDP rank); this callback then saves a full checkpoint (mid-epoch loop position
    included) before the process exits with status 143 (``brpg_lightning.cli``). Resume with
    ``ckpt_path=<dirpath>/<filename>``; the resumed run continues at the checkpoint's batch, exactly as the
    uninterrupted run (``tests/app/test_mid_epoch_resume.py``). Under SLURM, Lightning's ``SLURMEnvironment`` additionally requeues the job on its
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
