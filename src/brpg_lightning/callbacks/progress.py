"""Progress: the bar shows the BRPG stage, the loss terms and eta_t; one line per stage change.

Stages (paper Algorithm 1): ``pretrain`` (epochs before ``T_S1``), ``sampling`` (``[T_S1, T_S2)``),
``prototype`` (from ``T_S2``; the line for it is printed after clustering, with the clustering time).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_info

BAR_KEYS = {"train/L_s": "L_s", "train/L_u": "L_u", "train/L_pro": "L_pro", "brpg/eta_t": "eta_t"}
"""Logged metric -> short name on the bar (values of the latest step)."""


def brpg_callback(trainer: pl.Trainer) -> Any | None:
    """The trainer's BRPG callback (anything with ``stage(epoch)``, ``T_S1`` and ``T_S2``), or None."""
    for cb in trainer.callbacks:
        if callable(getattr(cb, "stage", None)) and hasattr(cb, "T_S1") and hasattr(cb, "T_S2"):
            return cb
    return None


def current_stage(trainer: pl.Trainer) -> str | None:
    """``pretrain`` | ``sampling`` | ``prototype`` for the current epoch, None without BRPG."""
    cb = brpg_callback(trainer)
    return None if cb is None else cb.stage(trainer.current_epoch)


class BRPGProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar plus ``stage``, the loss terms (``L_s``, ``L_u``, ``L_pro``) and ``eta_t``."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        stage = current_stage(trainer)
        extra: dict[str, int | str | float] = {} if stage is None else {"stage": stage}
        for key, short in BAR_KEYS.items():
            value = trainer.callback_metrics.get(key)
            if value is not None and value.numel() == 1:
                extra[short] = f"{float(value):.3g}"
        return {**extra, **items}


class StageMessages(pl.Callback):
    """One log line when the BRPG stage changes; the prototype line carries the clustering time."""

    def __init__(self) -> None:
        self.announced: str | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = brpg_callback(trainer)
        if cb is None:
            return
        stage = cb.stage(trainer.current_epoch)
        if stage == self.announced:
            return
        if stage == "pretrain":
            self._say(f"pretrain: epochs 0-{cb.T_S1 - 1} (mean teacher, no prototypes)")
        elif stage == "sampling":
            self._say(f"sampling: epochs {cb.T_S1}-{cb.T_S2 - 1} fill the memory banks")
        elif getattr(cb, "prototypes", None) is not None:  # resumed inside the prototype stage
            self._say(f"prototype: epoch {trainer.current_epoch} (resumed with {int(cb.proto_mask.sum())} prototypes)")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.announced == "prototype":
            return
        cb = brpg_callback(trainer)
        if cb is None or cb.stage(trainer.current_epoch) != "prototype" or getattr(cb, "prototypes", None) is None:
            return
        seconds = float(getattr(cb, "last_stats", {}).get("seconds", float("nan")))
        self._say(
            f"prototype: from epoch {cb.T_S2}, {int(cb.proto_mask.sum())} prototypes, clustering took {seconds:.2f} s"
        )

    def _say(self, text: str) -> None:
        self.announced = text.split(":", 1)[0]
        rank_zero_info(f"stage {text}")
