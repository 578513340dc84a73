"""A built wheel, installed non-editable into a fresh venv, runs the app from any directory.

The fresh venv reuses the already installed dependencies through a ``.pth`` line (no torch download or
reinstall); only the wheel itself is installed, with ``--no-deps --no-index``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]


CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BRPG_CONF_DIR")}
"""No PYTHONPATH: only the installed wheel may provide ``brpg_lightning``."""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    kwargs.setdefault("env", CLEAN_ENV)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_wheel_ships_configs_and_runs_from_another_directory(tmp_path: Path) -> None:
    # build from a copy, so the checkout gets no build/ or egg-info
    src = tmp_path / "src_copy"
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
          str(src)])
    (wheel,) = wheels.glob("brpg_lightning-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("brpg_lightning/conf/")}
    expected = {f"brpg_lightning/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert expected and expected <= shipped  # every config of the checkout is in the wheel

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)])
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "zz_shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # a user config folder on the search path: an experiment the package does not have
    user_conf = tmp_path / "my_conf" / "experiment"
    user_conf.mkdir(parents=True)
    (user_conf / "mine.yaml").write_text("# @package _global_\ntask_name: user_experiment\nseed: 7\n")

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = dict(CLEAN_ENV)
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    where = _run([str(py), "-c", "import brpg_lightning.config as c; print(c.__file__); print(c.config_dir())"],
                 cwd=workdir, env=env).stdout.split()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv))  # the installed copy, not the checkout

    run_dir = workdir / "run"
    args = [*TINY, "trainer.max_epochs=1", "brpg=none", f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}",
            f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "experiment=mine"]
    proc = _run([str(py), "-m", "brpg_lightning", *args], cwd=workdir, env=env, timeout=600)
    assert proc.stdout.strip().splitlines()[-1].startswith("final val/mIoU = ")
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= summary["final_mIoU"] <= 1.0
    cfg = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "task_name: user_experiment" in cfg and "seed: 7" in cfg
