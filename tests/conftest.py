"""Shared fixtures: compose the real Hydra config, shrunk to a CPU-seconds budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from brpg_lightning.config import config_dir, register_resolvers

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = (
    "dataset.synthetic.train_pool=40",
    "dataset.synthetic.val_size=8",
    "dataset.synthetic.image_size=64",
    "dataset.crop_size=64",
    "dataset.batch_size_labeled=2",
    "dataset.batch_size_unlabeled=2",
    "dataset.batch_size_val=4",
    "trainer.max_epochs=3",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "callbacks.progress_bar.refresh_rate=0",
    "sup_only_epochs=1",
    "dataset.num_workers=0",  # in-process loading: tiny runs start faster  # the synthetic preset warms up for 3 epochs; the tiny run has 3 in all
    "T_S1=1",
    "T_S2=2",
    "++brpg.V=400",
    "++brpg.sample_num=50",
    "++brpg.M_u=20",
    "++brpg.grid=8",
    "++brpg.snapshot_per_class=10",
    "model.weights_path=null",  # the pretext encoder has its own tests (tests/models/test_pretext.py)
)
"""Overrides that make a full three-stage run take seconds (epochs 0: sup-only, 1: sampling, 2: prototypes)."""


def compose_cfg(*overrides: str, output_dir: Path | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, outside a Hydra run."""
    register_resolvers()
    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=[*extra, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` resolves as in a real run
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def optim_node(optimizer: str = "sgd", **keywords: object) -> dict:
    """``conf/train.yaml``'s ``optim`` node with the ``conf/optim/optimizer/<optimizer>.yaml`` factory, its keywords
    updated by ``keywords``: the ``optim`` argument of a method built without Hydra."""
    conf = config_dir()
    node = OmegaConf.to_container(OmegaConf.load(conf / "train.yaml").optim)
    factory = OmegaConf.to_container(OmegaConf.load(conf / "optim" / "optimizer" / f"{optimizer}.yaml"))
    return {**node, "optimizer": {**factory, **keywords}}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset shared by the tests of a session (split 16: 16 labeled, 24 unlabeled)."""
    return tmp_path_factory.mktemp("synthetic") / "split16"


@pytest.fixture
def tiny_cfg(tmp_path: Path, synthetic_root: Path):
    """``tiny_cfg(*overrides)``: the default composition shrunk by :data:`TINY`, writing into ``tmp_path``."""

    def make(*overrides: str) -> DictConfig:
        return compose_cfg(*TINY, f"dataset.root={synthetic_root}", *overrides, output_dir=tmp_path / "run")

    return make


def random_semi_batch(b: int, num_classes: int, height: int, width: int) -> dict:
    """A seeded random ``{"labeled", "unlabeled"}`` batch in the datamodule's contract (no padding)."""
    g = torch.Generator().manual_seed(1)
    return {
        "labeled": {
            "image": torch.randn(b, 3, height, width, generator=g),
            "mask": torch.randint(0, num_classes, (b, height, width), generator=g),
        },
        "unlabeled": {
            "image": torch.randn(b, 3, height, width, generator=g),
            "image_strong": torch.randn(b, 3, height, width, generator=g),
            "valid": torch.ones(b, height, width, dtype=torch.bool),
        },
    }
