"""``python -m benchmarks.gpu --smoke``: the GPU benchmark's code path at tiny sizes on the CPU, so it never rots."""

from __future__ import annotations

import statistics

import pytest
from benchmarks.gpu import main, run


def test_smoke_measures_both_models_and_reports_their_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    lines, rows = run("smoke")
    assert [(r["case"].model, r["precision"]) for r in rows] == [("deeplabv3plus_small", "32"),
                                                                 ("dpt_dinov2_small", "32")]
    for r in rows:
        mt, brpg = r["times"]["MT"], r["times"]["MT+BRPG"]
        assert len(mt) == len(brpg) == 1 and min(mt + brpg) > 0
        assert "L_pro" in r["brpg_losses"]  # the prototype stage, not sampling
        assert r["ratio"] == pytest.approx(statistics.median(brpg) / statistics.median(mt))
        assert r["images_per_s"]["MT"] == pytest.approx(2 * r["case"].batch / statistics.median(mt))
        assert any(line.startswith(f"  {r['case'].label}, 32: {r['ratio']:.3f}x") for line in lines)
    with pytest.raises(SystemExit, match="no CUDA device"):  # the default mode needs a GPU (none in the suite)
        main([])
