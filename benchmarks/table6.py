"""Table 6 on the embedded benchmark, by one command: runs, a results file, and the README table rendered from it.

``python -m benchmarks.table6 --seeds 0,1,2,3,4 --out bench_results/table6 [--streams 2] [--render README.md]``

Trains every row (SupOnly, mean teacher, + plain L_pro, + CPG, + CPG + APO, all labels) for every seed, one
``python -m brpg_lightning`` process per cell (skipped when its ``metrics.json`` exists), writes
``<out>/table6.json`` (each cell's final val mIoU, the command, the machine, the commit) and prints the markdown
table: per row the mean and sd over seeds, and for each step of the ablation the **paired** difference (same
seed: same data order, same initialisation) with its 95 % t-interval. ``--render FILE`` replaces the text
between ``<!-- table6:start -->`` and ``<!-- table6:end -->`` in FILE with that table, so nothing is retyped.
``--report`` only reads existing runs, or, where ``--out`` holds only a ``table6.json`` (as
``docs/results/`` does for the README's table), that file.

``--streams N`` runs N cells side by side. Every cell uses the run's own ``num_threads`` setting, so a cell's
result does not depend on how many run beside it (on 2 cores: the synthetic preset's one thread per process,
two streams).

Not a ``bench_*`` module, so ``python -m benchmarks`` does not run it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sup_only": ("I SupOnly (`experiment=sup_only`)", ("experiment=sup_only",)),
    "mt": ("II mean teacher (`brpg=none`)", ("brpg=none",)),
    "plain": ("III + plain L_pro (`brpg=plain`)", ("brpg=plain",)),
    "cpg": ("IV + CPG (`brpg=cpg`)", ("brpg=cpg",)),
    "full": ("V + CPG + APO (the default)", ()),
    "ceiling": ("all 400 labels (`experiment=ceiling`)", ("experiment=ceiling",)),
}
"""Row key -> (label, Hydra overrides on top of the default composition)."""

STEPS: tuple[tuple[str, str, str], ...] = (
    ("mean teacher - SupOnly", "mt", "sup_only"),
    ("+ plain L_pro - mean teacher", "plain", "mt"),
    ("+ CPG - + plain L_pro", "cpg", "plain"),
    ("+ APO - + CPG", "full", "cpg"),
    ("full method - mean teacher", "full", "mt"),
)
"""The ablation's steps: (label, row, the row it is compared with)."""

START, END = "<!-- table6:start -->", "<!-- table6:end -->"


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for fewer than two values).

    >>> mean_sd([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd


def paired_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the paired differences ``a_i - b_i`` and its two-sided t-interval: ``(mean, low, high)``.

    ``mean +- t_{(1 + level) / 2, n - 1} * sd / sqrt(n)`` (scipy's Student t quantile); NaN bounds for n < 2.

    >>> m, lo, hi = paired_interval([0.5, 0.6, 0.7], [0.4, 0.4, 0.5])
    >>> round(m, 4), round(lo, 4), round(hi, 4)
    (0.1667, 0.0232, 0.3101)
    """
    from scipy.stats import t

    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, sd = mean_sd(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf((1 + level) / 2, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def render(results: dict[str, dict[str, float]], seeds: list[int]) -> str:
    """The markdown of the table (rows, then the paired steps) from ``{row: {seed: final mIoU}}``."""
    lines = ["| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd (n) |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for key, (label, _) in ROWS.items():
        cells = results.get(key, {})
        values = [cells[str(s)] for s in seeds if str(s) in cells]
        row = [f"{cells[str(s)]:.4f}" if str(s) in cells else "-" for s in seeds]
        if values:
            mean, sd = mean_sd(values)
            summary = f"{mean:.4f} ± {sd:.4f} ({len(values)})"
        else:
            summary = "-"
        lines.append(f"| {label} | " + " | ".join(row) + f" | {summary} |")
    lines += ["", "| step (paired over seeds) | mean difference | 95 % interval | above zero |", "|---|---|---|---|"]
    for label, row, base in STEPS:
        common = [str(s) for s in seeds if str(s) in results.get(row, {}) and str(s) in results.get(base, {})]
        if not common:
            lines.append(f"| {label} | - | - | - |")
            continue
        mean, lo, hi = paired_interval([results[row][s] for s in common], [results[base][s] for s in common])
        verdict = "n/a" if math.isnan(lo) else ("yes" if lo > 0 else "no")
        lines.append(f"| {label} | {mean:+.4f} (n={len(common)}) | [{lo:+.4f}, {hi:+.4f}] | {verdict} |")
    return "\n".join(lines)


def render_into(path: Path, table: str) -> None:
    """Replace the text between :data:`START` and :data:`END` in ``path`` with ``table``."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: no {START} ... {END} block to render the table into")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def run_dir(out: Path, row: str, seed: int) -> Path:
    return out / f"{row}-s{seed}"


def train(out: Path, row: str, seed: int, extra: list[str], lock: Path | None = None) -> None:
    """One training process (skipped when the cell already finished), holding ``lock`` (an exclusive
    ``flock``) while it runs, so that it never shares the cores with another heavy job that takes the lock."""
    target = run_dir(out, row, seed)
    if (target / "metrics.json").is_file():
        return
    if lock is not None:
        import fcntl

        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                return train(out, row, seed, extra)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    cmd = [sys.executable, "-m", "brpg_lightning", *ROWS[row][1], *extra, f"seed={seed}", f"hydra.run.dir={target}",
           "overwrite=true"]  # a cell without metrics.json is started again from scratch
    target.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def collect(out: Path, seeds: list[int]) -> dict[str, dict[str, float]]:
    """``{row: {seed: final mIoU}}`` from the cells' ``metrics.json`` in ``out``."""
    results: dict[str, dict[str, float]] = {}
    for row in ROWS:
        for seed in seeds:
            path = run_dir(out, row, seed) / "metrics.json"
            if path.is_file():
                results.setdefault(row, {})[str(seed)] = float(json.loads(path.read_text())["final_mIoU"])
    return results


def machine() -> str:
    import os

    import torch

    return (f"{platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.table6", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma list of seeds (at least 5 for the intervals)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=Path("bench_results/table6"))
    parser.add_argument("--streams", type=int, default=1, help="cells trained side by side")
    parser.add_argument("--extra", action="append", default=[], help="more Hydra overrides for every cell")
    parser.add_argument("--lock", type=Path, default=None, help="hold this flock file during each cell")
    parser.add_argument("--render", type=Path, default=None, help="render the table into this markdown file")
    parser.add_argument("--report", action="store_true", help="only read existing runs")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; expected names from {', '.join(ROWS)}")
    if not args.report:
        cells = [(row, seed) for seed in seeds for row in rows]
        with ThreadPoolExecutor(max_workers=max(1, args.streams)) as pool:
            list(pool.map(lambda c: train(args.out, c[0], c[1], args.extra, args.lock), cells))
    results = collect(args.out, seeds)
    stored = args.out / "table6.json"
    if args.report and not results and stored.is_file():  # a results file without its run folders (the README's)
        record = json.loads(stored.read_text())
        results = record["results"]
        print(f"from {stored}: {record['command']} at commit {record['commit']} on {record['machine']}")
    else:
        record = {
            "results": results, "seeds": seeds, "extra": args.extra, "machine": machine(), "commit": commit(),
            "command": "python -m benchmarks.table6 " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps(record, indent=1))
    table = render(results, seeds)
    print(table)
    if args.render is not None:
        render_into(args.render, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
