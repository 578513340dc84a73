"""The optimiser from config: ``optim.optimizer`` is a ``_partial_`` ``torch.optim`` factory (``conf/optim/optimizer``).

The method calls it with its parameter groups (:meth:`SegmentationModule.configure_optimizers`); the rest of the
``optim`` node (``head_lr_mult``, ``poly_power``, ``lr_scaling``, ``reference_batch``) shapes the groups and the
schedule. ``conf/train.yaml`` holds every value; nothing here repeats them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from brpg_lightning.config import renamed_key_message
from brpg_lightning.errors import BRPGInputError

OPTIM_KEYS = ("optimizer", "head_lr_mult", "poly_power", "lr_scaling", "reference_batch")
"""The keys of ``conf/train.yaml``'s ``optim`` node."""

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def check_optim(optim: Mapping[str, Any]) -> None:
    """One-line errors for keys that moved (``optim.lr`` -> ``optim.optimizer.lr``, ...) or are missing.

    >>> check_optim({"name": "adamw"})
    Traceback (most recent call last):
    ...
    brpg_lightning.errors.BRPGInputError: optim.name=adamw: the optimiser is the config group optim/optimizer now; use optim/optimizer=adamw
    """
    for key, value in optim.items():
        message = renamed_key_message(f"optim.{key}", value)
        if message is not None:
            raise BRPGInputError(message)
    missing = [key for key in OPTIM_KEYS if key not in optim]
    if missing:
        raise BRPGInputError(
            f"optim has no {', '.join(missing)}; expected the keys of conf/train.yaml's optim node: {', '.join(OPTIM_KEYS)}"
        )


def optimizer_factory(spec: Mapping[str, Any] | OptimizerFactory) -> OptimizerFactory:
    """``optim.optimizer`` as a callable ``factory(params, **overrides) -> Optimizer``.

    A config (``_target_``, ``_partial_: true``, keywords) is instantiated; a null keyword is left out, so that a
    recipe can turn one optimiser's node into another's (``momentum: null`` for AdamW). A callable is returned
    as it is (modules built without Hydra may pass ``functools.partial(torch.optim.SGD, lr=...)``).

    >>> factory = optimizer_factory({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 6e-5, "momentum": None})
    >>> sorted(factory.keywords)
    ['lr']
    """
    if callable(spec):
        return spec
    from hydra.utils import instantiate

    if not spec.get("_partial_", False):
        raise BRPGInputError(
            f"optim.optimizer._target_={spec.get('_target_')}: expected a factory (_partial_: true), as in "
            "conf/optim/optimizer"
        )
    return instantiate({key: value for key, value in spec.items() if value is not None})


def factory_lr(factory: OptimizerFactory) -> float:
    """The factory's ``lr`` keyword: the backbone learning rate (heads: x ``optim.head_lr_mult``)."""
    lr = getattr(factory, "keywords", {}).get("lr")
    if lr is None:
        raise BRPGInputError("optim.optimizer.lr is not set; the factory's lr is the backbone learning rate")
    return float(lr)
