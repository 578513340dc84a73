"""``logger=wandb`` offline: the run's transaction log, read back with W&B's own reader, holds the expected
scalars, the per-class IoU table, validation images with masks and the resolved config; no secret leaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

SECRET = "sk-test-secret-4f1c2a9e8b7d6c5b4a3f2e1d0c9b8a7f"


@pytest.mark.slow
def test_wandb_offline_run_logs_the_dashboards(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "WANDB_API_KEY": SECRET,
           "WANDB_CONFIG_DIR": str(tmp_path / "wb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wb_cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wb_data"), "WANDB_ARTIFACT_DIR": str(tmp_path / "wb_artifacts")}
    args = [*TINY, "logger=wandb", f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}",
            "logger.wandb.log_model=true", "callbacks.progress_bar.refresh_rate=1"]
    proc = subprocess.run([sys.executable, "-m", "brpg_lightning", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # progress: one line per stage change (with the clustering time), the bar shows stage, losses and eta_t
    out = proc.stdout + proc.stderr
    for line in ("stage pretrain:", "stage sampling:", "clustering took"):
        assert line in out, line
    assert "stage=prototype" in out and "L_pro=" in out and "eta_t=" in out, out[-2000:]
    (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    wandb_cli = Path(sys.executable).parent / "wandb"
    dump = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(log_file)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert dump.returncode == 0, dump.stderr[-2000:]
    records = [json.loads(line) for line in dump.stdout.splitlines() if line.startswith("{")]

    history: dict[str, list] = {}
    config: dict = {}
    artifacts = []
    for rec in records:
        if rec["type"] == "history":
            for key, value in rec["history"]["item"].items():  # media are flattened: "<key>.<field>"
                history.setdefault(key, []).append(value)
                if "." in key:
                    history.setdefault(key.split(".")[0], []).append(value)
        elif rec["type"] == "config":
            config.update(rec["config"].get("update", {}))
        elif rec["type"] == "artifact":
            artifacts.append(rec["artifact"])

    expected = [
        "train/loss", "train/L_s", "train/L_u", "brpg/L_pro_l", "brpg/L_pro_u", "brpg/eta_t",  # losses, eta_t
        "lr-AdamW/backbone", "lr-AdamW/head",  # learning rates
        "val/mIoU", "val/IoU/disc",  # metrics
        "brpg/bank_fill_high/1", "brpg/bank_fill_low/1", "brpg/prototypes/1",  # BRPG
        "val/IoU_table", "val/examples",  # table and images
    ]
    missing = [k for k in expected if k not in history]
    assert not missing, (missing, sorted(history))
    # dispersion (Eq. 11) is logged for every non-empty bank; in this tiny run only the low banks fill
    assert any(k.startswith("brpg/dispersion_") for k in history), sorted(history)
    assert all(0.8 <= v <= 0.95 for v in history["brpg/eta_t"])  # Eq. (19) range
    assert set(history["val/IoU_table._type"]) == {"table-file"} and set(history["val/IoU_table.nrows"]) == {7}
    assert all(str(t).startswith("images") for t in history["val/examples._type"])
    assert set(history["val/examples.count"]) == {4} and "all_masks" in str(records)
    assert config["run_config"]["brpg"]["T_S1"] == 1 and config["run_config"]["dataset"]["num_classes"] == 7
    assert any("model" in a.get("type", "") for a in artifacts)  # log_model=true: the checkpoint artifact

    files = run_dir / "wandb" / log_file.parent.name / "files" / "media"
    table = next(files.glob("table/val/IoU_table_*.table.json"))
    data = json.loads(table.read_text())
    assert data["columns"] == ["class", "IoU"] and len(data["data"]) == 7
    assert list(files.glob("images/mask/val/examples_*.mask.png")) and list(files.glob("images/val/examples_*.png"))

    for path in tmp_path.rglob("*"):  # no secret anywhere the run wrote
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), path
