"""``python -m brpg_lightning [overrides]``: the only ``@hydra.main`` of the project (training)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from brpg_lightning.cli import exit_on_bad_input
from brpg_lightning.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    from brpg_lightning.train import run  # heavy imports after Hydra parsed the command line

    return exit_on_bad_input(run)(cfg)


if __name__ == "__main__":
    main()
