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
from typing import Any

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


ASSETS = Path(__file__).resolve().parent / "assets"
"""Files shipped inside the package (the embedded default's pretrained encoder and its card)."""


def asset_path(relative: str) -> str:
    """``${brpg_asset:pretext/x.safetensors}``: a shipped file's absolute path, in a checkout or a wheel."""
    return str(ASSETS / relative)


def register_resolvers() -> None:
    """Register ``${brpg_root:}`` (:func:`project_root`) and ``${brpg_asset:...}`` (:func:`asset_path`) once."""
    if not OmegaConf.has_resolver("brpg_root"):
        OmegaConf.register_new_resolver("brpg_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("brpg_asset"):
        OmegaConf.register_new_resolver("brpg_asset", asset_path)


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


MANDATORY_EXAMPLES: dict[str, str] = {
    "ckpt_path": "ckpt_path=outputs/train/<run>/checkpoints/last.ckpt",
    "dataset.num_classes": "dataset.num_classes=5 (background and the object classes, as the masks' ids 0..4)",
    "split": "split=<name> (the dataset preset lists valid splits)",
    "input": "input=photos/ (an image or a folder)",
    "output": "output=predictions/ (a folder)",
}
"""Mandatory keys (``???`` in the configs) and an example of each for the one-line error."""


def unset_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Full keys of the mandatory values (``???``) left unset in ``cfg``, in config order.

    Interpolations are not resolved (``model.num_classes: ${dataset.num_classes}`` is reported once, as
    ``dataset.num_classes``), unlike ``OmegaConf.missing_keys``, which raises on them.

    >>> unset_keys(OmegaConf.create({"a": "???", "b": {"c": "???", "d": "${a}"}, "e": [1, "???"]}))
    ['a', 'b.c', 'e.1']
    """
    from omegaconf import DictConfig, ListConfig

    found: list[str] = []
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg)) if isinstance(cfg, ListConfig) else []
    for key in keys:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            found.append(full)
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig | ListConfig) and not node._is_interpolation() and not node._is_none():
            found.extend(unset_keys(node, f"{full}."))
    return found


def check_mandatory(cfg: Any, keys: tuple[str, ...] | None = None) -> None:
    """One-line :class:`BRPGInputError` naming the first mandatory key left unset (``keys``: only these
    top-level keys; None: every key of ``cfg``), with an example, instead of OmegaConf's ``MissingMandatoryValue``
    traceback when the key is first read.

    >>> check_mandatory(OmegaConf.create({"ckpt_path": "???", "input": "???"}))
    Traceback (most recent call last):
    ...
    brpg_lightning.errors.BRPGInputError: ckpt_path is not set; it is mandatory here, e.g. ckpt_path=outputs/train/<run>/checkpoints/last.ckpt (also unset: input)
    """
    missing = [k for k in keys if OmegaConf.is_missing(cfg, k)] if keys is not None else unset_keys(cfg)
    if missing:
        raise BRPGInputError(mandatory_message(missing[0], missing[1:]))


def mandatory_message(key: str, others: list[str] | tuple[str, ...] = ()) -> str:
    """``<key> is not set; it is mandatory here, e.g. <example>`` (+ the other unset keys)."""
    example = MANDATORY_EXAMPLES.get(key, f"{key}=<value>")
    also = f" (also unset: {', '.join(others)})" if others else ""
    return f"{key} is not set; it is mandatory here, e.g. {example}{also}"
