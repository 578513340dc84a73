"""Every config group composes and instantiates; cross-key values resolve as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from brpg_lightning.config import config_dir
from brpg_lightning.errors import BRPGInputError
from tests.conftest import compose_cfg

CONF = config_dir()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))



@pytest.mark.parametrize(
    "group",
    ["dataset", "model", "method", "brpg", "optim/optimizer", "trainer", "logger", "callbacks", "experiment", "debug"],
)
def test_every_option_of_every_group_composes(group: str, tmp_path: Path) -> None:
    opts = options(group)
    assert opts, f"conf/{group} is empty"
    for opt in opts:
        extra = ["dataset.num_classes=5"] if opt == "folder" else []
        cfg = compose_cfg(f"{group}={opt}", *extra, output_dir=tmp_path)
        OmegaConf.resolve(cfg)  # every interpolation resolves
        for key in ("dataset", "model", "method"):
            get_class(cfg[key]._target_)  # targets import
        if cfg.get("brpg") is not None:
            get_class(cfg.brpg._target_)
        get_class(cfg.optim.optimizer._target_)


def test_default_composition_is_the_embedded_synthetic_brpg_run(tmp_path: Path) -> None:
    cfg = compose_cfg(output_dir=tmp_path)
    assert cfg.dataset.name == "synthetic" and cfg.split == 16
    assert cfg.method._target_.endswith("MeanTeacher")
    assert cfg.brpg.name == "cpg_apo" and cfg.brpg.apo and cfg.brpg.banks == "confidence"
    assert cfg.model.encoder_weights is None  # the default never downloads


def test_paper_defaults_are_the_config_defaults(tmp_path: Path) -> None:
    """Sec. 4.1 / Sec. 3 values (paper wins over the official code)."""
    cfg = compose_cfg("dataset=folder", "dataset.num_classes=21", output_dir=tmp_path)
    b, m, o = cfg.brpg, cfg.method, cfg.optim
    assert (b.eta_s, b.sample_num, b.V, b.n0_h, b.n0_lw, b.alpha_t, b.n_add) == (0.8, 5000, 30000, 2, 2, 0.05, 1)
    assert (b.tau, b.grid, b.M_u, b.eta_0, b.eta_e, b.lambda_pro, b.prototype_ema) == (
        0.1, 32, 1000, 0.8, 0.95, 1.0, 0.99
    )
    assert (b.T_S1, b.T_S2, b.indicator, b.feature_source) == (1, 2, "cosine", "features")
    # official behaviours are options; the paper's are the defaults
    assert (b.apo_count, b.M_u_pooled, b.eta_t_origin, b.class_thresholds) == ("paper", False, "t_s2", False)
    assert (b.threshold_decay, b.threshold_low, b.threshold_high, list(b.threshold_fixed_classes)) == (
        0.999, 0.7, 0.9, []
    )
    assert (m.ema_decay, m.sup_only_epochs, m.lambda_u, m.unsup_filter, m.cutmix_p) == (
        0.99, None, 1.0, "entropy_percentile", 0.5
    )
    from brpg_lightning.methods.mean_teacher import MeanTeacher

    assert MeanTeacher.default_sup_only_epochs == 1  # null: the method's own warm-up, U2PL's sup_only_epoch
    assert (m.teacher_forward, m.lu_norm, m.label_padding) == ("student_batch", "paper", False)
    f = o.optimizer
    assert (f._target_, f._partial_, f.lr, o.head_lr_mult, f.momentum, f.weight_decay, o.poly_power) == (
        "torch.optim.SGD", True, 0.001, 10.0, 0.9, 1e-4, 0.9
    )
    assert cfg.model.feature_dim == 256 and cfg.trainer.max_epochs == 80


def test_experiments_hold_only_deltas(tmp_path: Path) -> None:
    sup = compose_cfg("experiment=sup_only", output_dir=tmp_path)
    ceil = compose_cfg("experiment=ceiling", output_dir=tmp_path)
    assert sup.method._target_.endswith("Supervised") and sup.split == 16
    assert ceil.method._target_.endswith("Supervised") and ceil.split == "full"
    assert sup.get("brpg") is None and ceil.get("brpg") is None  # `override /brpg: null`


def test_brpg_off_is_a_null_group_without_a_half_node(tmp_path: Path) -> None:
    """`brpg=none` (the command-line spelling; Hydra rejects `brpg=null` there) and `~brpg` leave no brpg node, on
    every dataset preset: the presets set the schedule at the top level, which conf/brpg/*.yaml read."""
    from brpg_lightning.train import brpg_enabled, build_callbacks

    for dataset in ("synthetic", "pascal", "cityscapes", "coco"):
        for off in ("brpg=none", "~brpg"):
            cfg = compose_cfg(f"dataset={dataset}", off, output_dir=tmp_path)
            assert cfg.get("brpg") is None, (dataset, off)
            assert not brpg_enabled(cfg)
    on = compose_cfg("dataset=cityscapes", output_dir=tmp_path)
    assert (on.T_S1, on.T_S2, on.brpg.T_S1, on.brpg.T_S2) == (3, 6, 3, 6)
    syn = compose_cfg("brpg=plain", output_dir=tmp_path)  # BRPG sized to the synthetic crop, any BRPG option
    assert (syn.brpg.T_S1, syn.brpg.T_S2, syn.brpg.grid, syn.brpg.M_u) == (3, 5, 16, 256)
    # both spellings of the schedule override it
    assert compose_cfg("brpg.T_S1=4", output_dir=tmp_path).brpg.T_S1 == 4
    assert compose_cfg("T_S1=4", output_dir=tmp_path).brpg.T_S1 == 4
    # a sweep's ++brpg.* overrides on a row without BRPG: a node without _target_, ignored
    cfg = compose_cfg("brpg=none", "++brpg.V=400", output_dir=tmp_path)
    assert not brpg_enabled(cfg) and not [c for c in build_callbacks(cfg) if hasattr(c, "T_S1")]


def test_optimiser_is_a_partial_factory_from_the_optim_optimizer_group(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    default = compose_cfg(output_dir=tmp_path).optim.optimizer  # synthetic: AdamW from scratch
    assert (default._target_, default.lr, default.weight_decay, list(default.betas)) == (
        "torch.optim.AdamW", 0.001, 0.01, [0.9, 0.999])
    sgd = compose_cfg("optim/optimizer=sgd", "optim.optimizer.lr=0.05", output_dir=tmp_path).optim.optimizer
    assert (sgd._target_, sgd.lr, sgd.momentum, sgd.weight_decay) == ("torch.optim.SGD", 0.05, 0.9, 0.01)
    factory = instantiate(sgd)
    opt = factory([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    # AdamW on a SGD preset changes only the optimiser: PASCAL's lr and wd stay, no SGD keyword leaks into it
    voc = compose_cfg("dataset=pascal", "optim/optimizer=adamw", output_dir=tmp_path).optim.optimizer
    assert (voc._target_, voc.lr, voc.weight_decay, "momentum" in voc) == ("torch.optim.AdamW", 0.001, 1e-4, False)


def test_split_flows_into_the_dataset(tmp_path: Path) -> None:
    cfg = compose_cfg("split=32", output_dir=tmp_path)
    assert cfg.dataset.split == 32 and cfg.dataset.synthetic.split == 32
    assert str(cfg.dataset.root).endswith("split32")


def test_num_threads_is_fixed_by_the_synthetic_preset_and_validated(tmp_path: Path) -> None:
    from brpg_lightning.train import check_run

    assert compose_cfg(output_dir=tmp_path).num_threads == 1  # one run per seed on any machine
    assert compose_cfg("dataset=folder", "dataset.num_classes=3", output_dir=tmp_path).num_threads is None
    for bad in ("0", "-1", "true"):
        with pytest.raises(BRPGInputError, match="num_threads"):
            check_run(compose_cfg(f"num_threads={bad}", output_dir=tmp_path))
