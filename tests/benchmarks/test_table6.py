"""The Table 6 renderer: its statistics against values worked by hand, and the README block it rewrites."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from benchmarks.table6 import END, START, mean_sd, paired_interval, render, render_into


def test_paired_interval_by_hand() -> None:
    # differences 0.02, 0.04, 0.00, 0.06, 0.03: mean 0.03, sd sqrt(0.002 / 4) = 0.022361,
    # t(0.975, 4) = 2.776445, half width 2.776445 * 0.022361 / sqrt(5) = 0.027764
    a = [0.52, 0.54, 0.50, 0.56, 0.53]
    b = [0.50, 0.50, 0.50, 0.50, 0.50]
    mean, lo, hi = paired_interval(a, b)
    assert mean == pytest.approx(0.03)
    assert lo == pytest.approx(0.03 - 0.027764, abs=1e-6) and hi == pytest.approx(0.03 + 0.027764, abs=1e-6)
    # pairing matters: the same values unpaired in another order give another interval
    assert paired_interval(a, b[::-1])[1] == pytest.approx(lo)  # b is constant: the order does not matter
    shuffled = [0.56, 0.50, 0.54, 0.52, 0.53]
    assert paired_interval(a, shuffled)[0] == pytest.approx(0.0)


def test_mean_sd_and_short_samples() -> None:
    assert mean_sd([0.4, 0.6]) == pytest.approx((0.5, math.sqrt(0.02)))
    assert math.isnan(mean_sd([0.4])[1])
    assert math.isnan(paired_interval([0.5], [0.4])[1])
    with pytest.raises(ValueError, match="length"):
        paired_interval([0.5, 0.6], [0.4])


def test_render_rows_steps_and_readme_block(tmp_path: Path) -> None:
    seeds = [0, 1, 2]
    results = {
        "sup_only": {"0": 0.40, "1": 0.42, "2": 0.41},
        "mt": {"0": 0.45, "1": 0.46, "2": 0.47},
        "full": {"0": 0.47, "1": 0.48, "2": 0.50},
    }
    table = render(results, seeds)
    assert "| I SupOnly (`experiment=sup_only`) | 0.4000 | 0.4200 | 0.4100 | 0.4100 ± 0.0100 (3) |" in table
    # mean teacher - SupOnly: differences 0.05, 0.04, 0.06 -> mean 0.05, sd 0.01, t(0.975, 2) = 4.302653
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert f"| mean teacher - SupOnly | +0.0500 (n=3) | [{0.05 - half:+.4f}, {0.05 + half:+.4f}] | yes |" in table
    assert "| + CPG - + plain L_pro | - | - | - |" in table  # rows not run
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold table\n{END}\noutro\n")
    render_into(readme, table)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{END}\noutro\n")
    assert "old table" not in text and table in text


def test_readme_table_is_the_rendering_of_the_results_file() -> None:
    """Nothing retyped: the README's Table 6 block is exactly what the committed results file renders to."""
    import json

    root = Path(__file__).resolve().parents[2]
    record = json.loads((root / "docs" / "results" / "table6.json").read_text())
    table = render(record["results"], record["seeds"])
    readme = (root / "README.md").read_text()
    assert f"{START}\n{table}\n{END}" in readme
