"""A tiny trained run shared by the inference tests (evaluate, predict, export, notebooks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY, compose_cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> dict[str, Any]:
    """One 3-epoch TINY run of the default (mean teacher + BRPG ``cpg_apo``), trained once per session.

    Epoch 0 is supervised, 1 samples the banks, 2 clusters (writes ``brpg/snapshot.pt``) and trains with
    ``L_pro``. Returns ``{"run_dir", "last", "best", "snapshot", "summary", "data_root"}``.
    """
    from brpg_lightning.train import train

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = compose_cfg(*TINY, f"dataset.root={synthetic_root}", output_dir=run_dir)
    summary, _ = train(cfg)
    return {
        "run_dir": run_dir,
        "last": Path(summary["last_checkpoint"]),
        "best": Path(summary["best_checkpoint"]),
        "snapshot": run_dir / "brpg" / "snapshot.pt",
        "summary": summary,
        "data_root": synthetic_root,
    }
