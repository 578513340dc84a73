"""Why does (or doesn't) semi-supervision pay off on the embedded benchmark? Repeatable diagnostic runs.

``python -m benchmarks.diagnose_semi --runs oracle,mt,sup_only --seeds 0 --out /tmp/diag [--epochs 30]
[--extra KEY=VALUE ...]`` trains each named run (one ``python -m brpg_lightning`` process per run and seed,
skipped when its ``metrics.json`` exists) and then prints, from the runs' ``csv/metrics.csv``:

- the final/best val mIoU of every run (the teacher for mean-teacher runs),
- the val mIoU per epoch of the evaluated model and, for mean-teacher runs, of the student,
- per epoch, the pseudo-label quality against the hidden true masks of the unlabeled images: the share of
  valid pixels the filter keeps, the pixel accuracy of the kept (and of all) pseudo-labels, and per class the
  share kept and the accuracy of the kept pixels of that true class.

``--report`` only prints from existing runs. Each run is a composition of the configs
(``conf/experiment/diagnose/``): mean-teacher runs read the synthetic generator's hidden
``.oracle/unlabeled_masks`` (``dataset.oracle_mask_dir``; written only when a diagnostic asks), which a normal
run never reads; ``oracle`` also replaces the teacher's pseudo-labels by them (``brpg_lightning.lab.oracle``). Runs are CPU-heavy (about 3 min each at
the default budget on 2 cores): on a shared machine wrap each call in ``flock /tmp/brpg-heavy.lock``.

Not a ``bench_*`` module, so ``python -m benchmarks`` does not run it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

QUALITY = "experiment=diagnose/quality"

RUNS: dict[str, tuple[str, ...]] = {
    "sup_only": ("experiment=sup_only",),
    "ceiling": ("experiment=ceiling",),
    "mt": (QUALITY, "brpg=none"),
    "mt_plain": (QUALITY, "brpg=plain"),
    "mt_cpg": (QUALITY, "brpg=cpg"),
    "mt_brpg": (QUALITY,),  # the default: mean teacher + CPG + APO
    "oracle": ("experiment=diagnose/oracle",),
    "mt_weak_only": (QUALITY, "brpg=none", "method.teacher_forward=weak_only"),
}
"""Named runs: Hydra overrides on top of the default composition."""


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / f"{name}-s{seed}"


def train(out: Path, name: str, seed: int, epochs: int | None, extra: list[str]) -> None:
    """One training process (skipped when the run already finished)."""
    target = run_dir(out, name, seed)
    if (target / "metrics.json").is_file():
        return
    cmd = [sys.executable, "-m", "brpg_lightning", *RUNS[name], *extra, f"seed={seed}", f"hydra.run.dir={target}",
           "overwrite=true"]  # a cell without metrics.json is started again from scratch
    if epochs is not None:
        cmd.append(f"trainer.max_epochs={epochs}")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def read_epochs(target: Path) -> dict[int, dict[str, float]]:
    """Per-epoch metrics from ``csv/metrics.csv`` (epoch -> key -> last logged value)."""
    rows: dict[int, dict[str, float]] = {}
    with open(target / "csv" / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for key, value in row.items():
                if value not in ("", None) and (key.startswith(("val/", "pl/"))):
                    rows.setdefault(epoch, {})[key] = float(value)
    return rows


def fmt(x: float | None) -> str:
    return "  -  " if x is None or math.isnan(x) else f"{x:.3f}"


def report(out: Path, names: list[str], seeds: list[int]) -> None:
    for name in names:
        for seed in seeds:
            target = run_dir(out, name, seed)
            if not (target / "metrics.json").is_file():
                print(f"\n## {name} seed {seed}: not run")
                continue
            summary = json.loads((target / "metrics.json").read_text())
            epochs = read_epochs(target)
            print(f"\n## {name} seed {seed}: final mIoU {summary['final_mIoU']:.4f}, best {summary['best_mIoU']:.4f}")
            print("epoch  val/mIoU  student  " + "  ".join(f"{k:>8s}" for k in ("pl kept", "acc kept", "acc all")))
            for e in sorted(epochs):
                m = epochs[e]
                print(f"{e:5d}  {fmt(m.get('val/mIoU')):>8s}  {fmt(m.get('val/student/mIoU')):>7s}  "
                      f"{fmt(m.get('pl/kept')):>8s}  {fmt(m.get('pl/acc_kept')):>8s}  {fmt(m.get('pl/acc_all')):>8s}")
            classes = sorted({k.split("/", 2)[2] for m in epochs.values() for k in m if k.startswith("pl/kept/")})
            if classes:
                print("per class, kept share / accuracy of the kept pixels of that true class:")
                print("epoch  " + "  ".join(f"{c[:11]:>11s}" for c in classes))
                for e in sorted(epochs):
                    m = epochs[e]
                    if "pl/kept" in m:
                        print(f"{e:5d}  " + "  ".join(
                            f"{fmt(m.get(f'pl/kept/{c}'))}/{fmt(m.get(f'pl/acc_kept_true/{c}'))}" for c in classes))
            ious = {k[len("val/IoU/"):]: v for k, v in summary["metrics"].items() if k.startswith("val/IoU/")}
            print("final per-class IoU: " + ", ".join(f"{k} {v:.3f}" for k, v in ious.items()))


def table(out: Path, names: list[str], seeds: list[int]) -> None:
    """Markdown table of the final val mIoU per run and seed, with mean +- sd (n) over the finished seeds."""
    print("\n| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd (n) |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for name in names:
        values = {}
        for seed in seeds:
            path = run_dir(out, name, seed) / "metrics.json"
            if path.is_file():
                values[seed] = json.loads(path.read_text())["final_mIoU"]
        cells = [f"{values[s]:.4f}" if s in values else "-" for s in seeds]
        v = list(values.values())
        if v:
            mean = sum(v) / len(v)
            sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
            summary = f"{mean:.4f} ± {sd:.4f} ({len(v)})" if len(v) > 1 else f"{mean:.4f} (1)"
        else:
            summary = "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {summary} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnose_semi", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="oracle,mt,mt_brpg,sup_only", help=f"comma list of {', '.join(RUNS)}")
    parser.add_argument("--seeds", default="0", help="comma list of seeds")
    parser.add_argument("--out", type=Path, default=Path("bench_results/diagnose_semi"))
    parser.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the preset's)")
    parser.add_argument("--extra", action="append", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--report", action="store_true", help="only print from existing runs")
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; expected names from {', '.join(RUNS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.report:
        for name in names:
            for seed in seeds:
                train(args.out, name, seed, args.epochs, args.extra)
    report(args.out, names, seeds)
    table(args.out, names, seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
