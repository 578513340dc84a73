"""DDP end to end: ``python -m brpg_lightning trainer=ddp_cpu`` (2 gloo processes on the CPU).

Every rank dumps its BRPG state (``tests/app/ddp_check.py: RankStateDump``); the banks after sampling, the
prototypes right after clustering and after the EMA updates, the weights and the validation mIoU must be
identical on both ranks. One run writes one run directory (the Hydra + DDP trap).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]
"""On the spawned processes' ``PYTHONPATH``: they import the test-only ``tests.app.ddp_check``."""


def _load(path: Path) -> dict:
    assert path.is_file(), path
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal(a, b, where: str) -> None:  # noqa: ANN001
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_cpu_ranks_hold_identical_banks_and_prototypes(tmp_path: Path) -> None:
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    args = [
        *TINY, "trainer=ddp_cpu", f"dataset.root={tmp_path / 'data'}",
        "+callbacks.rank_state._target_=tests.app.ddp_check.RankStateDump",
        "+callbacks.rank_state.dirpath=${paths.output_dir}/ranks",
    ]
    proc = subprocess.run([sys.executable, "-m", "brpg_lightning", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1, runs  # one run, one directory, whatever the number of processes
    run = runs[0]
    assert (run / "metrics.json").is_file() and (run / ".hydra" / "config.yaml").is_file()
    ranks = run / "ranks"

    for epoch in range(3):  # 0 pretrain, 1 sampling, 2 prototype
        r0, r1 = _load(ranks / f"rank0_epoch{epoch}.pt"), _load(ranks / f"rank1_epoch{epoch}.pt")
        assert r0["world_size"] == 2 and r0["batches"] == r1["batches"] == 3
        assert r0["val_mIoU"] is not None
        # an epoch = one pass over the unlabeled set, split over the ranks: 24 unlabeled / (2 ranks x B_u 2)
        # batches per rank, and as many labeled batches (TINY: 40 images, 16 labeled; split 16)
        assert r0["loader_batches"] == r1["loader_batches"] == {"labeled": 6, "unlabeled": 6}
        _assert_equal(r0, r1, f"epoch{epoch}")  # banks / prototypes / thresholds / synced val mIoU
    sampling = _load(ranks / "rank0_epoch1.pt")
    assert int(sampling["bank_high"]["count"].sum()) + int(sampling["bank_low"]["count"].sum()) > 0
    c0, c1 = _load(ranks / "rank0_clustered.pt"), _load(ranks / "rank1_clustered.pt")
    assert c0["proto_mask"].any()
    for key in ("prototypes", "proto_mask"):
        assert torch.equal(c0[key], c1[key]), key
    final = _load(ranks / "rank0_epoch2.pt")
    assert not torch.equal(final["prototypes"], c0["prototypes"])  # EMA updates moved them, identically
    # parameters (student and EMA teacher); BN running statistics are rank-local on CPU (no SyncBatchNorm)
    w0, w1 = _load(ranks / "rank0_student.pt"), _load(ranks / "rank1_student.pt")
    params = [k for k in w0 if "running_" not in k and "num_batches_tracked" not in k]
    assert any(k.startswith("teacher.") for k in params)
    _assert_equal({k: w0[k] for k in params}, {k: w1[k] for k in params}, "weights")


@pytest.mark.slow
def test_bf16_mixed_trains_and_evaluates_on_cpu(tiny_cfg) -> None:  # noqa: ANN001
    """``trainer.precision=bf16-mixed`` on the CPU: the three stages run, losses stay finite, mIoU is valid."""
    from brpg_lightning.train import train

    summary, objects = train(tiny_cfg("trainer.precision=bf16-mixed"))
    trainer = objects["trainer"]
    assert trainer.precision == "bf16-mixed"
    assert 0.0 <= summary["final_mIoU"] <= 1.0
    for key in ("train/loss", "brpg/L_pro_l"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    metrics = trainer.validate(objects["module"], datamodule=objects["datamodule"], verbose=False)[0]
    assert abs(metrics["val/mIoU"] - summary["final_mIoU"]) < 1e-6
