"""Run the benchmarks: ``python -m benchmarks [--quick] [--only NAME]``.

Discovers ``benchmarks/bench_*.py`` (each exposes ``run(quick: bool) -> list[str]``), prints a header
and the lines of each, and writes the same text to ``bench_results/<name>.txt`` (gitignored); nothing
is written elsewhere.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import benchmarks
from benchmarks.common import environment

RESULTS = Path("bench_results")


def discover() -> list[str]:
    """Names of the benchmark modules without the ``bench_`` prefix, sorted."""
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name.startswith("bench_")
    )


def main(argv: list[str] | None = None) -> int:
    names = discover()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, for smoke tests)")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help=f"run only these (of {', '.join(names)})"
    )
    args = parser.parse_args(argv)
    selected = names
    if args.only:
        wanted = [n.removeprefix("bench_").removesuffix(".py") for n in args.only]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; expected one of {', '.join(names)}")
        selected = [n for n in names if n in wanted]
    RESULTS.mkdir(exist_ok=True)
    print(environment(), "(quick)" if args.quick else "", flush=True)
    for name in selected:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        header = f"== {name} {'(quick) ' if args.quick else ''}" + "=" * max(0, 60 - len(name))
        print(header, flush=True)
        start = time.perf_counter()
        lines = module.run(quick=args.quick)
        lines.append(f"({time.perf_counter() - start:.1f} s)")
        for line in lines:
            print(line, flush=True)
        suffix = "_quick" if args.quick else ""
        (RESULTS / f"{name}{suffix}.txt").write_text("\n".join([environment(), header, *lines]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
