"""Ablation experiments: every config composes with every setting; one sweep runs end to end and collects."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from brpg_lightning.config import config_dir
from brpg_lightning.tools.collect import collect, main
from tests.conftest import TINY, compose_cfg

ABLATIONS = sorted(p.stem for p in (config_dir() / "experiment" / "ablation").glob("*.yaml"))


def _sweep_params(name: str) -> dict[str, str]:
    cfg = OmegaConf.load(config_dir() / "experiment" / "ablation" / f"{name}.yaml")
    return {str(k): str(v) for k, v in cfg.hydra.sweeper.params.items()}


def test_the_paper_ablations_exist() -> None:
    expected = {"table6", "table7", "table8", "table9", "fig7", "fig8", "a11_sample_num", "a12_V", "a13_eta_t",
                "a14_n_add"}
    assert expected <= set(ABLATIONS)


@pytest.mark.parametrize("name", ABLATIONS)
def test_every_setting_of_every_ablation_composes(name: str, tmp_path: Path) -> None:
    """Each sweep point (seeds aside) composes, resolves and differs from the others where it should."""
    params = _sweep_params(name)
    assert params.pop("seed") == "0,1,2"  # seeds are a sweep axis
    assert params, f"{name} sweeps nothing but seeds"
    for key, values in params.items():
        seen = []
        for value in values.split(","):
            cfg = compose_cfg(f"experiment=ablation/{name}", f"{key}={value}", output_dir=tmp_path)
            OmegaConf.resolve(cfg)
            assert cfg.task_name == f"ablation_{name}"
            if "@" in key:  # a settings group: the chosen file names itself
                assert cfg.setting == value
            else:
                assert str(OmegaConf.select(cfg, key)) == value
            seen.append(OmegaConf.to_yaml({k: cfg.get(k) for k in ("method", "brpg")}))
        assert len(set(seen)) == len(seen), f"{name}: two settings of {key} compose to the same method/brpg config"


def test_ablation_settings_match_the_paper(tmp_path: Path) -> None:
    def setting(name: str, option: str):
        return compose_cfg(f"experiment=ablation/{name}", f"experiment/ablation/{name}@_global_={option}",
                           output_dir=tmp_path)

    rows = {o: setting("table6", o) for o in ("I_sup_only", "II_unsup", "III_plain", "IV_cpg", "V_apo")}
    assert rows["I_sup_only"].method._target_.endswith("Supervised") and rows["I_sup_only"].get("brpg") is None
    assert rows["II_unsup"].method._target_.endswith("MeanTeacher") and rows["II_unsup"].get("brpg") is None
    assert (rows["III_plain"].brpg.banks, rows["III_plain"].brpg.apo) == ("plain", False)
    assert (rows["IV_cpg"].brpg.banks, rows["IV_cpg"].brpg.apo) == ("confidence", False)
    assert (rows["V_apo"].brpg.banks, rows["V_apo"].brpg.apo) == ("confidence", True)
    ema = setting("table8", "ema_0.7_0.9").brpg
    assert (ema.eta_s, ema.class_thresholds, ema.threshold_low, ema.threshold_high, ema.threshold_decay) == (
        0.8, True, 0.7, 0.9, 0.999)
    r = setting("table7", "r1_11").brpg
    assert (r.T_S1, r.T_S2) == (1, 11)
    fixed, linear = setting("a13_eta_t", "fixed_0.85").brpg, setting("a13_eta_t", "linear_0.8_0.95").brpg
    assert (fixed.eta_0, fixed.eta_e, linear.eta_0, linear.eta_e) == (0.85, 0.85, 0.8, 0.95)
    rand, cpg = setting("fig7", "random_n3").brpg, setting("fig7", "cpg_n3").brpg
    assert (rand.banks, rand.n0_h + rand.n0_lw, rand.apo) == ("plain", 3, False)
    assert (cpg.banks, cpg.n0_h, cpg.n0_lw, cpg.apo) == ("confidence", 3, 3, False)


@pytest.mark.parametrize(("name", "dataset"), [("table7", "pascal"), ("table7_cityscapes", "cityscapes")])
def test_every_table7_range_starts_after_the_warm_up(name: str, dataset: str, tmp_path: Path) -> None:
    """The start-up check passes every Table 7 row on its dataset: the T_S1 = 0 rows drop the warm-up."""
    from brpg_lightning.train import check_run

    for option in _sweep_params(name)["experiment/ablation/table7@_global_"].split(","):
        cfg = compose_cfg(f"experiment=ablation/{name}", f"dataset={dataset}",
                          f"experiment/ablation/table7@_global_={option}", output_dir=tmp_path)
        check_run(cfg)
        assert cfg.brpg.T_S1 >= (1 if cfg.sup_only_epochs is None else cfg.sup_only_epochs)


def _fake_job(sweep: Path, n: int, overrides: list[str], miou: float | None, ious: dict[str, float]) -> None:
    """A job folder as a Hydra multirun leaves it; ``miou=None``: the job never wrote ``metrics.json``."""
    job = sweep / str(n)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if miou is not None:
        metrics = {f"val/IoU/{k}": v for k, v in ious.items()}
        (job / "metrics.json").write_text(json.dumps({"final_mIoU": miou, "best_mIoU": miou + 0.01,
                                                      "metrics": metrics}))


def test_collect_groups_fabricated_jobs_by_setting_over_seeds(tmp_path: Path) -> None:
    """Rows keep the sweep order (numeric, 10 after 9), seeds are averaged (sample sd), unfinished jobs
    show in ``n``, constant overrides do not split rows, per-class columns follow the first job's classes."""
    sweep = tmp_path / "sweep"
    table6 = "experiment/ablation/table6@_global_"
    values = {"V_apo": [0.50, 0.60, 0.70], "I_sup_only": [0.30, 0.40, None]}
    n = 0
    for setting in ("V_apo", "I_sup_only"):
        for seed, miou in enumerate(values[setting]):
            _fake_job(sweep, n if n < 2 else n + 8, ["trainer.max_epochs=3", f"{table6}={setting}", f"seed={seed}"],
                      miou, {"background": 0.9, "cat": (miou or 0) / 2})
            n += 1
    header, rows = collect(sweep, per_class=True)
    assert header == ["setting", "n", "final_mIoU (%)", "background", "cat"]
    assert rows == [
        ["V_apo", "3", "60.00 ± 10.00", "90.00 ± 0.00", "30.00 ± 5.00"],
        ["I_sup_only", "2/3", "35.00 ± 7.07", "90.00 ± 0.00", "17.50 ± 3.54"],
    ]
    _, best = collect(sweep, metric="best_mIoU")
    assert [r[2] for r in best] == ["61.00 ± 10.00", "36.00 ± 7.07"]
    assert main([str(sweep), "--csv", str(tmp_path / "t.csv")]) == 0
    with (tmp_path / "t.csv").open() as fh:
        assert list(csv.reader(fh))[1] == ["V_apo", "3", "60.00 ± 10.00"]


@pytest.mark.slow
def test_two_job_multirun_runs_and_collects(tmp_path: Path) -> None:
    """A real multirun (2 jobs, one run directory each, 3 tiny epochs: pretrain, sampling, prototype) collects
    into one row per setting whose value is the job's own ``metrics.json``."""
    sweep = tmp_path / "sweep"
    args = [*TINY, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            f"dataset.root={tmp_path / 'data'}", "brpg.apo=false,true", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-m", "brpg_lightning", "-m", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted(sweep.glob("*/metrics.json"))
    assert [p.parent.name for p in jobs] == ["0", "1"]
    header, rows = collect(sweep, per_class=True)
    assert [r[:2] for r in rows] == [["apo=False", "1"], ["apo=True", "1"]] and len(header) == 3 + 7
    for job, row in zip(jobs, rows, strict=True):
        summary = json.loads(job.read_text())
        assert row[2] == f"{100 * summary['final_mIoU']:.2f}"
        assert row[3] == f"{100 * summary['metrics']['val/IoU/background']:.2f}"
    assert main([str(sweep)]) == 0
    with (sweep / "summary.csv").open() as fh:
        table = list(csv.reader(fh))
    assert table[0][:3] == ["setting", "n", "final_mIoU (%)"] and len(table) == 3


def test_collect_rejects_a_folder_without_jobs(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
