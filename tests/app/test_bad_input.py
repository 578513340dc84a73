"""Bad input: one line naming the key/path/value and what was expected, non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from brpg_lightning.errors import BRPGInputError

ENV = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


def test_unknown_override_key_is_hydras_error(tmp_path: Path) -> None:
    proc = run_module("brpg_lightning", "dataset.no_such_key=1", cwd=tmp_path)
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr and "Could not override" in proc.stderr


def test_missing_dataset_root_names_path_and_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    proc = run_module(
        "brpg_lightning", "dataset=folder", "dataset.num_classes=3", f"dataset.root={missing}", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert str(missing) in line and "labeled/images" in line and "unlabeled/images" in line


def test_invalid_split_lists_valid_splits(tmp_path: Path) -> None:
    proc = run_module("brpg_lightning", "split=17", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "17" in line and "16, 32, full" in line


def test_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "none.ckpt"
    proc = run_module("brpg_lightning.evaluate", f"ckpt_path={missing}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert str(missing) in line and "no such checkpoint" in line


def test_resume_from_missing_checkpoint_is_one_line(tiny_cfg) -> None:
    from brpg_lightning.train import run

    cfg = tiny_cfg("ckpt_path=/no/such/last.ckpt")
    with pytest.raises(BRPGInputError, match="/no/such/last.ckpt"):
        run(cfg)


def test_bad_brpg_values_are_named(tiny_cfg) -> None:
    from brpg_lightning.train import build_callbacks

    with pytest.raises(BRPGInputError, match="brpg.indicator='cos'"):
        build_callbacks(tiny_cfg("brpg.indicator=cos"))
    with pytest.raises(BRPGInputError, match="T_S1=3"):
        build_callbacks(tiny_cfg("brpg.T_S1=3", "brpg.T_S2=2"))


def test_sampling_before_the_warm_up_ends_is_refused_at_start_up(tiny_cfg) -> None:
    from brpg_lightning.train import check_run, train

    with pytest.raises(BRPGInputError, match=r"brpg.T_S1=1 < sup_only_epochs=2") as info:
        train(tiny_cfg("sup_only_epochs=2"))  # before any data or network is built
    assert "\n" not in str(info.value)
    # null: the method's own warm-up (mean teacher: 1), named with its value
    with pytest.raises(BRPGInputError, match=r"brpg.T_S1=0 < sup_only_epochs=null \(= MeanTeacher's 1\)"):
        check_run(tiny_cfg("sup_only_epochs=null", "T_S1=0"))
    check_run(tiny_cfg("sup_only_epochs=null"))  # T_S1 = 1 = the warm-up: sampling starts as it ends
    check_run(tiny_cfg("sup_only_epochs=3", "brpg=none"))  # no BRPG, no sampling
    check_run(tiny_cfg("method=fixmatch", "sup_only_epochs=null", "T_S1=0"))  # FixMatch: no warm-up


def test_moved_optim_keys_name_the_new_key(tmp_path: Path, tiny_cfg) -> None:
    from brpg_lightning.train import check_run

    for arg, new in (("optim.name=adamw", "optim/optimizer=adamw"), ("optim.lr=0.01", "optim.optimizer.lr=0.01"),
                     ("+optim.weight_decay=0.1", "optim.optimizer.weight_decay=0.1")):
        proc = run_module("brpg_lightning", arg, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        (line,) = error_lines(proc)
        assert new in line, line
    # set in a config file (or forced with ++): the same line at start-up
    with pytest.raises(BRPGInputError, match=r"optim.momentum=0.5: .* use optim.optimizer.momentum=0.5"):
        check_run(tiny_cfg("++optim.momentum=0.5"))


def test_error_message_is_folded_to_one_line() -> None:
    assert "\n" not in str(BRPGInputError("a\nb   c"))
