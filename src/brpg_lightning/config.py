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
