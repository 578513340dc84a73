"""Fault injection: a default-shaped tiny run (mean teacher + ``cpg_apo``; warm-up, sampling and prototype
stages) is killed with SIGKILL at points the test chooses, resumed each time from the newest readable checkpoint
in its run directory, and ends equal to the uninterrupted run: the same weights, teacher, optimiser, BRPG state
(prototypes) and RNG states, bit for bit, and a CSV log in which no step appears twice and every value equals
the uninterrupted run's (rows logged after their own checkpoint can be missing).

The kill points (``tests/app/fault_hooks.KillAt``, attached through the ``callbacks`` config), in the order one
run meets them (3 epochs of 3 steps, a step checkpoint every 2 steps, ``step.ckpt``):

1. inside the training step of global step 4 (epoch 1, sampling) -> resumes from ``step.ckpt`` (step 4);
2. during the validation of epoch 1 -> resumes from ``step.ckpt`` (step 6, before that validation);
3. inside the clustering at T_S2 (first step of epoch 2) -> resumes from step 6 (end of epoch 1);
4. half-way through writing the checkpoint of step 8 -> a torn temporary file, the old files intact; resumes
   from step 6 again, and the start-up deletes the temporary file.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brpg_lightning.checkpoint import newest_readable_checkpoint
from brpg_lightning.plugins import TEMPORARY
from tests.app.test_mid_epoch_resume import _assert_equal, _training_state
from tests.conftest import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {  # the spawned runs import the test-only hook (tests.app.fault_hooks)
    **os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
}
RUN = (
    *TINY,
    "trainer.deterministic=true",
    "callbacks.step_checkpoint.every_n_train_steps=2",
    "+logger.csv.flush_logs_every_n_steps=1",  # every row on disk at once: a killed run leaves its later rows
)
KILLS = (
    ("train_step", "+callbacks.kill.step=4"),
    ("validation", "+callbacks.kill.epoch=1"),
    ("clustering",),
    ("checkpoint_write", "+callbacks.kill.step=8"),
)


def _cli(tmp_path: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [*RUN, f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}", *extra]
    return subprocess.run([sys.executable, "-m", "brpg_lightning", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=900)


def _log(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _column(rows: list[dict[str, str]], key: str) -> list[tuple[str, str]]:
    return [(row["step"], row[key]) for row in rows if row.get(key)]


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(tmp_path: Path) -> None:
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "killed"
    straight = _cli(tmp_path, straight_dir)
    assert straight.returncode == 0, straight.stderr[-3000:]

    folder = run_dir / "checkpoints"
    survived, ckpt_path = [], None
    for point, *options in KILLS:
        resume = [] if ckpt_path is None else [f"ckpt_path={ckpt_path}"]
        killed = _cli(tmp_path, run_dir, *resume, "+callbacks.kill._target_=tests.app.fault_hooks.KillAt",
                      f"+callbacks.kill.point={point}", *options)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
        temporaries = [p for p in folder.iterdir() if TEMPORARY.match(p.name)]
        assert bool(temporaries) == (point == "checkpoint_write"), (point, temporaries)  # the torn write
        ckpt_path = newest_readable_checkpoint(folder)
        assert ckpt_path is not None and not TEMPORARY.match(ckpt_path.name)
        survived.append((point, ckpt_path.name, torch.load(ckpt_path, map_location="cpu", weights_only=True,
                                                           mmap=True)["global_step"]))
    # the newest good checkpoint after each kill: mid-epoch (step 4), the end of epoch 1 (step 6: step.ckpt before
    # its validation or last.ckpt after it), never the torn write of step 8
    assert [step for _, _, step in survived] == [4, 6, 6, 6], survived
    assert survived[0][1] == "step.ckpt", survived

    final = _cli(tmp_path, run_dir, f"ckpt_path={ckpt_path}")
    assert final.returncode == 0, final.stderr[-3000:]
    assert "temporary file of a checkpoint write that was interrupted" in final.stdout + final.stderr
    assert not [p for p in folder.iterdir() if TEMPORARY.match(p.name)]

    a = torch.load(straight_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    (brpg,) = [v for k, v in b["callbacks"].items() if "BRPGCallback" in k]
    assert brpg["prototypes"] is not None
    _assert_equal(_training_state(b), _training_state(a), "last.ckpt")  # weights, teacher, prototypes, RNG, ...

    # the log: no step twice; every logged value is the uninterrupted run's at that step
    ours, theirs = _log(run_dir), _log(straight_dir)
    for key in ("train/loss", "val/mIoU"):
        mine, reference = _column(ours, key), dict(_column(theirs, key))
        steps = [step for step, _ in mine]
        assert len(steps) == len(set(steps)), (key, steps)
        assert all(reference.get(step) == value for step, value in mine), key
    # rows can be missing: those logged after their own checkpoint was written (a step checkpoint's step; an
    # epoch-end checkpoint's validation: Lightning logs it after the checkpoint) are cut on resume, not logged again
    assert len(_column(theirs, "val/mIoU")) == 3 and _column(ours, "val/mIoU")[-1] == _column(theirs, "val/mIoU")[-1]


def test_start_up_removes_only_stale_temporaries_of_the_writer(tmp_path: Path) -> None:
    """A writer killed mid-write leaves ``.<name>.tmp-<pid>-<hex>``; start-up deletes such files whose process is
    gone (never another file), and they are never taken for a checkpoint."""
    from brpg_lightning.plugins import remove_stale_temporaries, temporary_name

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 1}, folder / "last.ckpt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    stale = folder / f".last.ckpt.tmp-{dead_pid}-0123abcd"
    stale.write_bytes(b"PK\x03\x04 torn")
    mine = folder / temporary_name("best.ckpt")  # this process's: nothing writes at start-up, so stale too
    mine.write_bytes(b"torn")
    live = folder / f".step.ckpt.tmp-{os.getppid()}-89abcdef"  # a running process's write: left alone
    live.write_bytes(b"being written")
    others = [folder / n for n in (".last.ckpt.tmp-x-0123abcd", "last.ckpt.tmp-1-0123abcd", ".notes.tmp", "a.ckpt.tmp")]
    for path in others:
        path.write_bytes(b"user file")
    assert newest_readable_checkpoint(folder) == folder / "last.ckpt"  # a newer temporary is never picked
    assert sorted(remove_stale_temporaries(folder)) == sorted([stale, mine])
    assert all(p.is_file() for p in (*others, live, folder / "last.ckpt")) and not stale.exists()
