"""The notebooks run top to bottom (nbclient, a real kernel) on the tiny run's checkpoint and BRPG snapshot.

Each notebook reads its paths from its first code cell (tagged ``parameters``); the test inserts a cell after
it with the tiny run's paths, as papermill does, and checks the numbers each notebook prints against its own
computation from the snapshot.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def execute(name: str, params: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run ``notebooks/<name>`` with ``params`` injected; returns every cell's printed text, in order."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    (at,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(params))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    env_path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(NOTEBOOKS.parent / "src")) if p)
    monkeypatch.setenv("PYTHONPATH", env_path)  # the kernel imports this checkout's brpg_lightning
    start = time.perf_counter()
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
    return ["".join(o.get("text", "") for o in c.get("outputs", []) if o.get("output_type") == "stream")
            for c in nb.cells if c.cell_type == "code"]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_confidence_notebook_reports_the_per_class_similarities(tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fig = tmp_path / "fig2.png"
    texts = execute("confidence.ipynb", f"RUN_DIR = Path({str(tiny_run['run_dir'])!r})\nSAVE_FIG = {str(fig)!r}",
                    monkeypatch)
    (line,) = [ln for t in texts for ln in t.splitlines() if ln.startswith("[{")]
    rows = {r["class"]: r for r in json.loads(line)}
    snap = torch.load(tiny_run["snapshot"], weights_only=True)
    f = snap["features"].double().numpy()
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    names = ["background", "disc", "square", "triangle", "ring", "cross", "bar"]
    for c in np.unique(snap["labels"].numpy()):
        m = snap["labels"].numpy() == c
        centre = f[m].mean(0) / np.linalg.norm(f[m].mean(0))
        for b, key in ((0, "high"), (1, "low")):
            mb = m & (snap["bank"].numpy() == b)
            if mb.any():
                assert abs(rows[names[c]][key] - float((f[mb] @ centre).mean())) < 1e-4
                assert rows[names[c]][f"n_{key}"] == int(mb.sum())
    assert is_png(fig)


@pytest.mark.slow
def test_prototypes_notebook_embeds_features_and_prototypes(tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fig = tmp_path / "fig9.png"
    texts = execute(
        "prototypes.ipynb",
        f"RUN_DIR = Path({str(tiny_run['run_dir'])!r})\nPER_CLASS = 8\nSAVE_FIG = {str(fig)!r}", monkeypatch,
    )
    snap = torch.load(tiny_run["snapshot"], weights_only=True)
    n_feat = sum(min(8, int(((snap["labels"] == c) & (snap["bank"] == b)).sum())) for c in range(7) for b in (0, 1))
    pmask, pbank = snap["proto_mask"], snap["proto_bank"]
    high, low = int((pmask & (pbank == 0)).sum()), int((pmask & (pbank == 1)).sum())
    text = "\n".join(texts)
    assert f"{n_feat} features, {high + low} prototypes ({high} high, {low} low confidence)" in text
    assert f"embedded ({n_feat + high + low}, 2)" in text
    assert is_png(fig)


@pytest.mark.slow
def test_predictions_notebook_draws_the_grid(tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fig = tmp_path / "fig10.png"
    params = (f"CHECKPOINTS = {{'best': Path({str(tiny_run['best'])!r}), 'last': Path({str(tiny_run['last'])!r})}}\n"
              f"N_IMAGES = 3\nSAVE_FIG = {str(fig)!r}")
    texts = execute("predictions.ipynb", f"RUN_DIR = Path({str(tiny_run['run_dir'])!r})\n{params}", monkeypatch)
    text = "\n".join(texts)
    assert f"3 images from {tiny_run['data_root'] / 'val'}; checkpoints: ['best', 'last']" in text
    assert "grid 3 x 4" in text
    assert is_png(fig)
