"""``python -m brpg_lightning.tools.collect <sweep dir>``: one markdown table (and a CSV) from a Hydra multirun.

Every job folder of the sweep (``<sweep dir>/<n>/``) holds ``.hydra/overrides.yaml`` (its command-line and
sweep overrides) and ``metrics.json`` (written by ``train``). Jobs are grouped by the overrides that vary
across the sweep, except ``seed``; each group is a row with ``n`` (finished jobs) and mean +- sd (sample
standard deviation, ``ddof=1``) of the metric in percent, optionally per class. Rows keep the sweep order.

Example:
    python -m brpg_lightning -m experiment=ablation/table6
    python -m brpg_lightning.tools.collect multirun/ablation_table6/2026-01-01_12-00-00 --per-class
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from brpg_lightning.errors import BRPGInputError

SEED_KEYS = ("seed",)
METRICS = ("final_mIoU", "best_mIoU")


def _job_dirs(sweep: Path) -> list[Path]:
    jobs = [p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def label(key: str, value: str) -> str:
    """Short row label for one override: settings groups show their option, keys their last part."""
    if "@" in key or "/" in key:  # e.g. experiment/ablation/table6@_global_=V_apo
        return value
    return f"{key.rsplit('.', 1)[-1]}={value}"


def load_jobs(sweep: Path) -> list[dict[str, Any]]:
    """``[{"dir", "overrides": {key: value}, "summary": metrics.json or None}]`` in sweep order."""
    if not sweep.is_dir():
        raise BRPGInputError(f"sweep directory {sweep} does not exist; expected a Hydra multirun folder")
    dirs = _job_dirs(sweep)
    if not dirs:
        raise BRPGInputError(f"{sweep} holds no job folders with .hydra/overrides.yaml; expected a multirun folder")
    jobs = []
    for d in dirs:
        overrides = dict(_split(o) for o in OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "overrides.yaml")) or [])
        metrics = d / "metrics.json"
        jobs.append({"dir": d, "overrides": overrides,
                     "summary": json.loads(metrics.read_text()) if metrics.is_file() else None})
    return jobs


def _fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def collect(sweep: Path, metric: str = "final_mIoU", per_class: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table (strings, as printed)."""
    if metric not in METRICS:
        raise BRPGInputError(f"--metric {metric}; expected one of {', '.join(METRICS)}")
    jobs = load_jobs(sweep)
    keys = sorted({k for j in jobs for k in j["overrides"]})
    varying = [k for k in keys if k not in SEED_KEYS and len({j["overrides"].get(k) for j in jobs}) > 1]
    groups: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        name = " ".join(label(k, job["overrides"][k]) for k in varying if k in job["overrides"]) or "all"
        groups.setdefault(name, []).append(job)
    classes: list[str] = []
    if per_class:
        for job in jobs:
            for key in (job["summary"] or {}).get("metrics", {}):
                if key.startswith("val/IoU/") and key[8:] not in classes:
                    classes.append(key[8:])
    header = ["setting", "n", f"{metric} (%)", *classes]
    rows = []
    for name, members in groups.items():
        done = [j["summary"] for j in members if j["summary"] is not None]
        values = [float(s[metric]) for s in done if not math.isnan(float(s[metric]))]
        row = [name, f"{len(values)}/{len(members)}" if len(values) != len(members) else str(len(values)), _fmt(values)]
        for cls in classes:
            row.append(_fmt([float(s["metrics"][f"val/IoU/{cls}"]) for s in done if f"val/IoU/{cls}" in s["metrics"]]))
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brpg_lightning.tools.collect", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="the multirun folder (holding 0/, 1/, ...)")
    parser.add_argument("--metric", default="final_mIoU", help=f"one of {', '.join(METRICS)} (default final_mIoU)")
    parser.add_argument("--per-class", action="store_true", help="add one column per class IoU")
    parser.add_argument("--csv", type=Path, default=None, help="CSV path (default <sweep>/summary.csv)")
    args = parser.parse_args(argv)
    try:
        header, rows = collect(args.sweep, args.metric, args.per_class)
    except BRPGInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.csv or args.sweep / "summary.csv"
    with out.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    print(markdown(header, rows))
    print(f"\n(mean ± sample sd over seeds, in %; n = finished jobs; CSV: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
