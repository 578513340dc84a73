"""Locating ``conf/`` from any working directory, and the OmegaConf resolvers the configs use."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from brpg_lightning.errors import BRPGInputError


def config_dir() -> Path:
    """The ``conf/`` folder: ``$BRPG_CONF_DIR`` if set, else the repository's top-level ``conf/``.

    The package is installed in editable mode from the repository (``make install``), so the repository
    is found relative to this file, whatever the working directory.
    """
    env = os.environ.get("BRPG_CONF_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "conf")
    for path in candidates:
        if (path / "train.yaml").is_file():
            return path
    raise BRPGInputError(
        f"config folder not found (looked in {', '.join(map(str, candidates))}); expected conf/train.yaml, "
        "or set BRPG_CONF_DIR"
    )


def register_resolvers() -> None:
    """Register ``${brpg_root:}`` (the repository root) once."""
    if not OmegaConf.has_resolver("brpg_root"):
        OmegaConf.register_new_resolver("brpg_root", lambda: str(config_dir().parent))
