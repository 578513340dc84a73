"""End-to-end: the real entry points on a tiny synthetic budget (marked slow; few on purpose)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}


@pytest.mark.slow
def test_train_three_stages_then_evaluate(tmp_path: Path) -> None:
    """``python -m brpg_lightning`` (mean teacher + BRPG cpg_apo) writes checkpoints and metrics;
    ``python -m brpg_lightning.evaluate`` on the checkpoint reproduces the logged mIoU."""
    run_dir = tmp_path / "run"
    args = [*TINY, f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "brpg_lightning", *args], cwd=tmp_path, env=ENV, capture_output=True, text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("final val/mIoU = ")

    summary = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= summary["final_mIoU"] <= 1.0
    # the last line's comparison: the labeled-only warm-up (TINY: epoch 0) is the best val mIoU of its epochs
    with (run_dir / "csv" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    warmup = [float(r["val/mIoU"]) for r in rows if r.get("val/mIoU") and int(float(r["epoch"])) < 1]
    assert warmup and summary["warmup_best_mIoU"] == pytest.approx(max(warmup))
    assert f"labeled-only warm-up best {max(warmup):.4f}" in last_line
    assert "per-class IoU (last validation): background " in proc.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and Path(summary["best_checkpoint"]).is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "brpg" / "snapshot.pt").is_file()
    log = proc.stderr + proc.stdout + (run_dir / "train.log").read_text()
    assert "BRPG[cpg_apo]: clustered" in log

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "BRPGCallback" in k]
    assert state["prototypes"] is not None and state["proto_mask"].any()
    metrics_csv = (run_dir / "csv" / "metrics.csv").read_text()
    for key in ("brpg/L_pro_l", "brpg/L_pro_u", "brpg/eta_t", "train/L_u", "val/mIoU"):
        assert key in metrics_csv, key

    ev = subprocess.run(
        [sys.executable, "-m", "brpg_lightning.evaluate", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
         f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-4000:]
    (line,) = [ln for ln in ev.stdout.splitlines() if ln.startswith("val/mIoU = ")]  # a report line follows it
    miou = float(line.split("=")[1].split()[0])
    assert abs(miou - summary["final_mIoU"]) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["sup_only", "ceiling"])
def test_baselines_train_in_process(tiny_cfg, experiment: str, tmp_path: Path) -> None:
    from brpg_lightning.train import train

    cfg = tiny_cfg(f"experiment={experiment}", "trainer.max_epochs=1", f"dataset.root={tmp_path / experiment}")
    summary, objects = train(cfg)
    trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
    assert summary["warmup_best_mIoU"] is None  # labeled-only methods have no warm-up to compare with
    assert not module.uses_unlabeled
    # sup_only sees the 16 labeled images of the split, the ceiling every training image (TINY: 40, 8 for val)
    assert len(datamodule.labeled_set) == {"sup_only": 16, "ceiling": 40}[experiment]
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    # the reported mIoU is the trained weights' on the validation set, not a stale or default value
    again = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/mIoU"]
    assert summary["final_mIoU"] == pytest.approx(again, abs=1e-6) and summary["final_mIoU"] > 0.0
