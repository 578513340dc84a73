"""``python -m brpg_lightning [overrides]``: the only ``@hydra.main`` of the project (training)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from brpg_lightning.cli import EXIT_BAD_INPUT, exit_on_bad_input
from brpg_lightning.config import check_renamed_overrides, config_dir, register_resolvers
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.run_dir import check_run_dir_overrides

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def train_main(cfg: DictConfig) -> float:
    from brpg_lightning.train import run  # heavy imports after Hydra parsed the command line

    return exit_on_bad_input(run)(cfg)


def main() -> float:
    """Renamed keys first (``optim.lr`` -> ``optim.optimizer.lr``): one line instead of Hydra's "Could not override";
    then a ``hydra.run.dir`` that holds another run, before Hydra writes its ``.hydra/`` into it."""
    try:
        check_renamed_overrides(sys.argv[1:])
        check_run_dir_overrides(sys.argv[1:])
    except BRPGInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    return train_main()


if __name__ == "__main__":
    main()
