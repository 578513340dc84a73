"""Locating the configs from any working directory, and the OmegaConf resolvers the configs use.

The top-level ``conf/`` of the repository is the only source of truth. A non-editable install (``pip install
.`` or a wheel) ships the same files as package data, ``brpg_lightning/conf/`` (``setup.py`` maps the
``brpg_lightning.conf`` package onto ``conf/``), so ``python -m brpg_lightning`` runs from any directory.
User configs (own datasets, experiments) are added with Hydra's search path, never by editing the package:
``python -m brpg_lightning 'hydra.searchpath=[file:///path/to/my_conf]' dataset=my_dataset``.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from brpg_lightning.errors import BRPGInputError

SOURCE_CONF = Path(__file__).resolve().parents[2] / "conf"
"""``conf/`` of a source checkout (editable install)."""
PACKAGE_CONF = Path(__file__).resolve().parent / "conf"
"""``conf/`` shipped inside an installed package (wheel / ``pip install .``)."""


def config_dir() -> Path:
    """The config folder: ``$BRPG_CONF_DIR`` if set, else the checkout's ``conf/``, else the packaged copy.

    Raises:
        BRPGInputError: when none of them holds ``train.yaml``.
    """
    env = os.environ.get("BRPG_CONF_DIR")
    candidates = [Path(env)] if env else [SOURCE_CONF, PACKAGE_CONF]
    for path in candidates:
        if (path / "train.yaml").is_file():
            return path
    raise BRPGInputError(
        f"config folder not found (looked in {', '.join(map(str, candidates))}); expected train.yaml there, "
        "or set BRPG_CONF_DIR to a folder holding it"
    )


def project_root() -> Path:
    """Root for ``paths.root_dir`` (``.cache/``, ``data/``): the checkout, or the working directory.

    In a source checkout (or with ``BRPG_CONF_DIR``) it is the folder holding ``conf/``; for an installed
    package it is the current working directory, never ``site-packages``.
    """
    conf = config_dir()
    if conf == PACKAGE_CONF and not os.environ.get("BRPG_CONF_DIR"):
        return Path.cwd()
    return conf.parent


def register_resolvers() -> None:
    """Register ``${brpg_root:}`` (:func:`project_root`) once."""
    if not OmegaConf.has_resolver("brpg_root"):
        OmegaConf.register_new_resolver("brpg_root", lambda: str(project_root()))


RENAMED_KEYS: dict[str, str] = {
    "optim.name": "optim/optimizer",
    "optim.lr": "optim.optimizer.lr",
    "optim.momentum": "optim.optimizer.momentum",
    "optim.weight_decay": "optim.optimizer.weight_decay",
    "optim.betas": "optim.optimizer.betas",
}
"""Keys that moved, old -> new: the optimiser is a ``_partial_`` factory from the ``optim/optimizer`` group
(``conf/optim/optimizer``), holding its own keywords."""


def renamed_key_message(key: str, value: object) -> str | None:
    """The one-line error for a key of :data:`RENAMED_KEYS` set to ``value``, else None.

    >>> renamed_key_message("optim.name", "adamw")
    'optim.name=adamw: the optimiser is the config group optim/optimizer now; use optim/optimizer=adamw'
    >>> renamed_key_message("optim.lr", 0.01)
    'optim.lr=0.01: the optimiser keywords are under optim.optimizer now; use optim.optimizer.lr=0.01'
    >>> renamed_key_message("optim.lr_scaling", "linear") is None
    True
    """
    new = RENAMED_KEYS.get(key)
    if new is None:
        return None
    if key == "optim.name":
        return f"{key}={value}: the optimiser is the config group {new} now; use {new}={value}"
    return f"{key}={value}: the optimiser keywords are under optim.optimizer now; use {new}={value}"


def check_renamed_overrides(overrides: list[str]) -> None:
    """Raise the one-line :class:`BRPGInputError` for a command-line override of a renamed key.

    Hydra would refuse such an override with a multi-line "Could not override" that does not name the new key.

    >>> check_renamed_overrides(["seed=1", "-m", "optim.lr_scaling=linear"])
    >>> check_renamed_overrides(["++optim.weight_decay=0.01"])
    Traceback (most recent call last):
    ...
    brpg_lightning.errors.BRPGInputError: optim.weight_decay=0.01: the optimiser keywords are under optim.optimizer now; use optim.optimizer.weight_decay=0.01
    """
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("~+").split("=", 1)
        message = renamed_key_message(key.strip(), value)
        if message is not None:
            raise BRPGInputError(message)
