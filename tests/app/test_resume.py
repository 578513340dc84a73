"""Exact resume, determinism and SIGTERM pre-emption on CPU (deterministic settings, tiny budget).

A straight run of 5 epochs (0 pretrain, 1-2 sampling, 3-4 prototype) is compared bit for bit with the same
run resumed from its epoch-boundary checkpoints: after epoch 1 (inside sampling: the banks travel in the
checkpoint) and after epoch 3 (after clustering: the prototypes travel). Equality is exact (``torch.equal``):
the same ops run in the same order on one CPU process, and the RNG states travel in the checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brpg_lightning.brpg.callback import brpg_callbacks
from tests.conftest import TINY, compose_cfg

EPOCHS = 5
RESUME = (
    *TINY,
    f"trainer.max_epochs={EPOCHS}",
    "T_S1=1",
    "T_S2=3",
    "trainer.deterministic=true",
    "callbacks.last_checkpoint=null",
    "callbacks.model_checkpoint.save_top_k=-1",  # one checkpoint per epoch
    "callbacks.model_checkpoint.filename='epoch{epoch:03d}'",
)


def _run(out: Path, data: Path, *extra: str):
    from brpg_lightning.train import train

    cfg = compose_cfg(*RESUME, f"dataset.root={data}", *extra, output_dir=out)
    summary, objects = train(cfg)
    return summary, objects["module"], brpg_callbacks(objects["trainer"])["student"].memory


def _assert_same_state(a, b) -> None:  # noqa: ANN001
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key  # student, teacher (incl. teacher.steps), BN buffers


@pytest.mark.slow
def test_straight_and_resumed_runs_are_identical_and_deterministic(tmp_path: Path) -> None:
    data = tmp_path / "data"
    straight, module, brpg = _run(tmp_path / "straight", data)
    ckpts = {int(p.stem[5:]): p for p in (tmp_path / "straight" / "checkpoints").glob("epoch*.ckpt")}
    assert sorted(ckpts) == list(range(EPOCHS))
    assert brpg.prototypes is not None and int(module.teacher.steps) > 0

    # determinism: the same seed gives the same metrics and weights
    again, module2, _ = _run(tmp_path / "again", data)
    assert again["metrics"] == straight["metrics"]
    _assert_same_state(module, module2)

    sampling = torch.load(ckpts[1], map_location="cpu", weights_only=True)
    (bstate,) = [v for k, v in sampling["callbacks"].items() if "BRPGCallback" in k]
    assert bstate["bank_high"] is not None and bstate["prototypes"] is None  # inside sampling
    for epoch in (1, 3):  # resume inside sampling / after clustering
        resumed, rmodule, rbrpg = _run(tmp_path / f"resumed{epoch}", data, f"ckpt_path={ckpts[epoch]}")
        _assert_same_state(module, rmodule)
        assert torch.equal(brpg.prototypes, rbrpg.prototypes) and torch.equal(brpg.proto_mask, rbrpg.proto_mask)
        # metrics of the final epoch (the resumed trainer never saw keys logged only in earlier epochs)
        a, b = resumed["metrics"], straight["metrics"]
        assert {"val/mIoU", "train/loss", "train/L_pro", "brpg/eta_t"} <= a.keys() <= b.keys()
        assert {k: a[k] for k in a} == {k: b[k] for k in a}, epoch


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status", "what"), [(signal.SIGTERM, 143, "pre-empted (SIGTERM)"),
                                                       (signal.SIGINT, 130, "interrupted (SIGINT)")])
def test_sigterm_writes_a_resumable_checkpoint(tmp_path: Path, signum: int, status: int, what: str) -> None:
    """SIGTERM (or Ctrl-C's SIGINT) to the CLI: it writes checkpoints/preempted.ckpt at a batch boundary, exits 143
    (130), its last error line names the resume command; the checkpoint resumes to the end."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}
    args = [*TINY, f"dataset.root={tmp_path / 'data'}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "brpg_lightning", *args, "trainer.max_epochs=40", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    first = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == status, out[-3000:]
    preempted = run_dir / "checkpoints" / "preempted.ckpt"
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert line == f"error: {what}; resume with ckpt_path={preempted}", out[-3000:]
    assert preempted.is_file(), out[-3000:]
    ckpt = torch.load(preempted, map_location="cpu", weights_only=True)
    assert 0 < ckpt["epoch"] < 40 and any("RNGStateCheckpoint" in k for k in ckpt["callbacks"])

    resumed = subprocess.run(
        [sys.executable, "-m", "brpg_lightning", *args, f"trainer.max_epochs={ckpt['epoch'] + 2}",
         f"ckpt_path={preempted}", f"hydra.run.dir={tmp_path / 'resumed'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1].startswith("final val/mIoU = ")
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == ckpt["epoch"] + 1 and last["global_step"] > ckpt["global_step"]
