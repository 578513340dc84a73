"""``python -m brpg_lightning.evaluate ckpt_path=PATH [dataset.<key>=VALUE ...]``: mIoU of a checkpoint.

The run's configuration travels inside the checkpoint (``hyper_parameters.run_config``), so the model,
method and dataset are rebuilt exactly; ``dataset.*`` entries given on the command line override the
stored ones (another root, another evaluation protocol). Evaluates the method's ``eval_model``: the
teacher's classification head for mean teacher (paper Sec. 4.1.6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from brpg_lightning.cli import exit_on_bad_input
from brpg_lightning.config import config_dir, register_resolvers
from brpg_lightning.errors import BRPGInputError

register_resolvers()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(..., weights_only=True)`` with a one-line error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise BRPGInputError(f"ckpt_path={path}: no such checkpoint file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "run_config" not in ckpt.get("hyper_parameters", {}):
        raise BRPGInputError(f"ckpt_path={path}: not a brpg-lightning checkpoint (no hyper_parameters.run_config)")
    return ckpt


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Rebuild the run from the checkpoint and validate it; returns ``{"val/mIoU": ..., "val/IoU/<class>": ...}``."""
    import pytorch_lightning as pl

    from brpg_lightning.train import build_datamodule, build_module

    ckpt = load_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(ckpt["hyper_parameters"]["run_config"])
    if cfg.get("dataset"):
        run_cfg.dataset = OmegaConf.merge(run_cfg.dataset, cfg.dataset)
    datamodule = build_datamodule(run_cfg)
    module = build_module(run_cfg, class_names=datamodule.class_names)
    module.load_state_dict(ckpt["state_dict"])
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer), logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    datamodule.prepare_data()
    results = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return {k: float(v) for k, v in results.items()}


def run(cfg: DictConfig) -> float:
    results = evaluate(cfg)
    for key in sorted(k for k in results if k.startswith("val/IoU/")):
        print(f"{key[len('val/IoU/'):]:>20s}  {results[key]:.4f}")
    print(f"val/mIoU = {results['val/mIoU']:.4f} ({cfg.ckpt_path})", flush=True)
    return results["val/mIoU"]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return exit_on_bad_input(run)(cfg)


if __name__ == "__main__":
    main()
