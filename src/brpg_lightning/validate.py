"""Every user-facing value checked in one place at start-up: a table of ``key -> rule``.

A value outside its range would otherwise be accepted silently (``brpg.eta_s=1.5``: no feature is ever
high-confidence) or fail late with a traceback (``brpg.tau=0``: NaN at the prototype stage, an epoch or more into
the run). Each failure is one :class:`BRPGInputError` line: ``<key>=<value>: expected <range>``.

Keys absent from the composition (a method without ``ema_decay``, ``brpg=none``) are not checked; ``brpg.*`` is
checked only when BRPG is on (a sweep may pass ``++brpg.*`` overrides to rows without it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from omegaconf import DictConfig, OmegaConf

from brpg_lightning.errors import BRPGInputError

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """``ok(value)`` holds for an accepted value; ``expected`` says which, for the error line."""

    ok: Callable[[Any], bool]
    expected: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int | None = None) -> Rule:
    return Rule(lambda v: _is_int(v) and (low is None or v >= low),
                "an integer" + (f" >= {low}" if low is not None else ""))


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Rule:
    """A finite number in the interval (``*_open``: the bound itself excluded)."""

    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return not (high is not None and (v >= high if high_open else v > high))

    if low is not None and high is not None:
        text = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        text = f"a number {'>' if low_open else '>='} {low}"
    else:
        text = f"a number {'<' if high_open else '<='} {high}"
    return Rule(ok, text)


def one_of(*choices: Any) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def _precisions() -> tuple[str, ...]:
    """Lightning's own list of ``precision`` values (its aliases included)."""
    from lightning_fabric.plugins.precision.precision import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    return (*get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS))


TRAIN_RULES: dict[str, Rule] = {
    "seed": integer(0),
    "dataset.num_classes": integer(2),
    "trainer.max_epochs": Rule(lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1 (or -1: no limit)"),
    "trainer.num_nodes": integer(1),
    "trainer.accumulate_grad_batches": integer(1),
    "optim.optimizer.lr": number(0, low_open=True),
    "optim.optimizer.weight_decay": number(0),
    "optim.optimizer.momentum": Rule(lambda v: v is None or number(0, 1).ok(v), "a number in [0, 1] or null"),
    "optim.head_lr_mult": number(0, low_open=True),
    "optim.poly_power": number(0),
    "optim.reference_batch": integer(1),
    "method.ema_decay": number(0, 1),
    "method.lambda_u": number(0),
    "method.eta": number(0, 1),
    "method.beta": number(0, low_open=True),
    "method.cutmix_p": number(0, 1),
    "method.drop_percent_start": number(0, 100),
    "sup_only_epochs": Rule(lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0 or null"),
    "dataset.max_image_pixels": Rule(lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
}
"""Keys of every training run."""

BRPG_RULES: dict[str, Rule] = {
    "brpg.T_S1": integer(0),
    "brpg.T_S2": integer(1),
    "brpg.eta_s": number(0, 1, low_open=True, high_open=True),
    "brpg.threshold_decay": number(0, 1),
    "brpg.threshold_low": number(0, 1),
    "brpg.threshold_high": number(0, 1),
    "brpg.sample_num": integer(1),
    "brpg.V": integer(1),
    "brpg.n0_h": integer(1),
    "brpg.n0_lw": integer(0),  # 0: no low-confidence prototypes (Fig. 7's random rows)
    "brpg.alpha_t": number(0, 1),
    "brpg.n_add": integer(0),
    "brpg.kmeans_iters": integer(1),
    "brpg.tau": number(0, low_open=True),
    "brpg.grid": integer(1),
    "brpg.M_u": integer(1),
    "brpg.eta_0": number(0, 1),
    "brpg.eta_e": number(0, 1),
    "brpg.lambda_pro": number(0),
    "brpg.prototype_ema": number(0, 1),
    "brpg.snapshot_per_class": integer(0),
}
"""Keys of BRPG (``conf/brpg/*.yaml``), checked when BRPG is on."""


def value_of(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``; ``_ABSENT`` when the key is not in the composition or cannot be resolved
    here (its own check, or Hydra's, names it)."""
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except Exception:  # noqa: BLE001 - unset (``???``) keys are named by check_mandatory, bad interpolations by OmegaConf
        return _ABSENT


def shown(value: Any) -> str:
    """``1.5``, ``'abc'``: strings quoted, so that ``seed='abc'`` reads as the text it is."""
    return repr(value) if isinstance(value, str) else str(value)


def check_values(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    """The first value of ``cfg`` breaking its rule, as one line: ``<key>=<value>: expected <range>``.

    >>> check_values(OmegaConf.create({"brpg": {"tau": 0}}), BRPG_RULES)
    Traceback (most recent call last):
    ...
    brpg_lightning.errors.BRPGInputError: brpg.tau=0: expected a number > 0
    """
    for key, rule in rules.items():
        value = value_of(cfg, key)
        if value is not _ABSENT and not rule.ok(value):
            raise BRPGInputError(f"{key}={shown(value)}: expected {rule.expected}")


def check_device(key: str, value: Any) -> None:
    """A GPU asked for (``gpu``/``cuda``, ``cuda:<n>``) where torch sees none: one line, before anything is built."""
    import torch

    text = str(value).lower()
    if text in ("gpu", "cuda") or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BRPGInputError(f"{key}={shown(value)}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                                 f"False); expected cpu or auto")
        index = text.partition(":")[2]
        if index.isdigit() and int(index) >= torch.cuda.device_count():
            raise BRPGInputError(f"{key}={shown(value)}: only {torch.cuda.device_count()} CUDA GPU(s) visible; "
                                 f"expected cuda:0..cuda:{torch.cuda.device_count() - 1}")


def check_train_values(cfg: DictConfig, brpg_on: bool) -> None:
    """Every rule of :data:`TRAIN_RULES` (and :data:`BRPG_RULES` when ``brpg_on``), the trainer's precision and
    accelerator, and BRPG's sampling starting before the last epoch."""
    check_values(cfg, TRAIN_RULES)
    precision = value_of(cfg, "trainer.precision")
    if precision is not _ABSENT and str(precision) not in _precisions():
        raise BRPGInputError(f"trainer.precision={shown(precision)}: expected one of "
                             f"{', '.join(p for p in _precisions() if '-' in p)}")
    accelerator = value_of(cfg, "trainer.accelerator")
    if accelerator is not _ABSENT:
        check_device("trainer.accelerator", accelerator)
    if not brpg_on:
        return
    check_values(cfg, BRPG_RULES)
    t_s1, t_s2, epochs = (value_of(cfg, k) for k in ("brpg.T_S1", "brpg.T_S2", "trainer.max_epochs"))
    if _is_int(t_s2) and t_s2 <= t_s1:
        raise BRPGInputError(f"brpg.T_S2={t_s2}: expected an integer > brpg.T_S1={t_s1} (sampling epochs "
                             f"[T_S1, T_S2))")
    if _is_int(epochs) and epochs != -1 and t_s1 >= epochs:
        # epochs count from 0, so sampling at epoch T_S1 needs max_epochs > T_S1; the prototypes come at T_S2
        raise BRPGInputError(f"brpg.T_S1={t_s1} with trainer.max_epochs={epochs}: BRPG would never run; expected "
                             f"T_S1 < max_epochs (and T_S2 < max_epochs for its prototype stage), or brpg=none")
