"""Execute a notebook with parameters injected after its ``parameters`` cell (as papermill does).

    python notebooks/render.py notebooks/prototypes.ipynb 'RUN_DIR=Path("outputs/train/<run>")' \
        'SAVE_FIG="docs/figures/prototypes_tsne.png"' [--out executed.ipynb]

Each ``NAME=EXPR`` becomes a line of the injected cell. The kernel runs in the notebook's folder: pass absolute
paths (or paths relative to ``notebooks/``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("params", nargs="*", help="NAME=EXPR assignments")
    parser.add_argument("--out", type=Path, default=None, help="write the executed notebook here")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    (at,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(args.params)))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    start = time.perf_counter()
    NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(args.notebook.resolve().parent)}}).execute()
    print(f"{args.notebook}: executed in {time.perf_counter() - start:.1f} s")
    if args.out:
        nbformat.write(nb, args.out)


if __name__ == "__main__":
    main()
