"""Progress: the bar shows the BRPG stage, the loss terms and eta_t; one line per stage change.

Stages (paper Algorithm 1): ``pretrain`` (epochs before ``T_S1``), ``sampling`` (``[T_S1, T_S2)``),
``prototype`` (from ``T_S2``; the line for it is printed after clustering, with the clustering time).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_info

from brpg_lightning.brpg.callback import BRPGCallback, brpg_callbacks

BAR_KEYS = {"train/L_s": "L_s", "train/L_u": "L_u", "train/L_pro": "L_pro", "brpg/eta_t": "eta_t"}
"""Logged metric -> short name on the bar (values of the latest step), as a one-network method logs them;
:func:`bar_keys` gives the keys of the run at hand."""


def bar_keys(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
    """:data:`BAR_KEYS` as this run logs them: a method that trains several networks (CPS) logs each one's losses
    as ``train/<network>/L_s`` and its BRPG scalars as ``brpg/<network>/eta_t`` (the callback's ``log_prefix``);
    the bar shows the first network's."""
    networks = tuple(getattr(pl_module, "networks", ()) or ())
    losses = f"train/{networks[0]}/" if len(networks) > 1 else "train/"
    cbs = brpg_callbacks(trainer)
    brpg = next(iter(cbs.values())).log_prefix if cbs else "brpg/"
    prefixes = {"train/": losses, "brpg/": brpg}
    out = {}
    for key, short in BAR_KEYS.items():
        head, name = key.split("/", 1)
        out[prefixes[head + "/"] + name] = short
    return out


def current_stage(trainer: pl.Trainer) -> str | None:
    """``pretrain`` | ``sampling`` | ``prototype`` for the current epoch, None without BRPG (every network's
    callback has the same ``T_S1``/``T_S2``: one config builds them all)."""
    cb = next(iter(brpg_callbacks(trainer).values()), None)
    return None if cb is None else cb.stage(trainer.current_epoch)


class BRPGProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar plus ``stage``, the loss terms (``L_s``, ``L_u``, ``L_pro``) and ``eta_t``."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        stage = current_stage(trainer)
        extra: dict[str, int | str | float] = {} if stage is None else {"stage": stage}
        for key, short in bar_keys(trainer, pl_module).items():
            value = trainer.callback_metrics.get(key)
            if value is not None and value.numel() == 1:
                extra[short] = f"{float(value):.3g}"
        return {**extra, **items}


class StageMessages(pl.Callback):
    """One log line when the BRPG stage changes; the prototype line carries the clustering time."""

    def __init__(self) -> None:
        self.announced: str | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cbs = brpg_callbacks(trainer)
        if not cbs:
            return
        cb = next(iter(cbs.values()))
        stage = cb.stage(trainer.current_epoch)
        if stage == self.announced:
            return
        if stage == "pretrain":
            self._say(f"pretrain: epochs 0-{cb.T_S1 - 1} (mean teacher, no prototypes)")
        elif stage == "sampling":
            self._say(f"sampling: epochs {cb.T_S1}-{cb.T_S2 - 1} fill the memory banks")
        elif all(c.memory.prototypes is not None for c in cbs.values()):  # resumed inside the prototype stage
            self._say(f"prototype: epoch {trainer.current_epoch} (resumed with {_prototypes(cbs)})")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.announced == "prototype":
            return
        cbs = brpg_callbacks(trainer)
        if not cbs or any(
            c.stage(trainer.current_epoch) != "prototype" or c.memory.prototypes is None for c in cbs.values()
        ):
            return
        seconds = sum(float(c.memory.last_stats.get("seconds", float("nan"))) for c in cbs.values())
        t_s2 = next(iter(cbs.values())).T_S2
        self._say(f"prototype: from epoch {t_s2}, {_prototypes(cbs)}, clustering took {seconds:.2f} s")

    def _say(self, text: str) -> None:
        self.announced = text.split(":", 1)[0]
        rank_zero_info(f"stage {text}")


def _prototypes(cbs: dict[str, BRPGCallback]) -> str:
    """The prototype count, per network when there are several (CPS: ``24 prototypes (net1 12, net2 12)``)."""
    counts = {net: int(cb.memory.proto_mask.sum()) for net, cb in cbs.items()}
    total = f"{sum(counts.values())} prototypes"
    return total if len(counts) == 1 else f"{total} ({', '.join(f'{n} {c}' for n, c in counts.items())})"
