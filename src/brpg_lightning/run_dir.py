"""A run never writes into a directory that already holds another run's outputs.

Checked twice: on the command line before Hydra starts (``hydra.run.dir=<dir>``: Hydra would otherwise replace
that run's ``.hydra/`` and append to its log before the task runs), and at the start of ``train`` (any other
way the directory is chosen: a config's ``hydra.run.dir``, ``paths.output_dir``, direct calls). Light imports
only: ``python -m brpg_lightning`` runs the first check before importing torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from brpg_lightning.errors import BRPGInputError

RUN_OUTPUTS: tuple[str, ...] = ("checkpoints", "metrics.json", "csv")
"""What a run writes into its directory, besides Hydra's ``.hydra/`` and log (written before the task runs,
so they do not mark a run: a fresh run's own directory holds them when ``train`` starts)."""
LAUNCH_RANK_VARIABLES: tuple[str, ...] = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
"""Set by Lightning's DDP launcher (``LOCAL_RANK``, ``NODE_RANK`` for the ranks it re-runs), torchrun and SLURM."""
TRUE = ("true", "yes", "on", "1")


def is_first_launch() -> bool:
    """Whether this process is the run's rank 0: no launcher variable names another rank.

    Lightning re-runs the command for ranks 1.. with ``LOCAL_RANK`` set and ``hydra.run.dir`` pointing at rank
    0's directory, where rank 0 may already be writing; torchrun and SLURM start every rank at once. Only rank 0
    judges the run directory, so the other ranks never refuse the directory their own run is filling.
    """
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in LAUNCH_RANK_VARIABLES)


def run_outputs_in(out: Path) -> list[str]:
    """The run outputs present in ``out`` (an empty folder does not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def check_run_dir(out: str | Path, ckpt_path: str | Path | None = None, overwrite: bool = False) -> None:
    """Refuse a run directory that already holds a run's outputs (``checkpoints/``, ``metrics.json``, ``csv/``):
    the new run would replace that run's checkpoints, metrics and logs. Allowed when the run resumes from a
    checkpoint inside that directory (``ckpt_path``), with ``overwrite``, and on every rank but rank 0.
    """
    if overwrite or not is_first_launch():
        return
    out = Path(out)
    found = run_outputs_in(out)
    if not found:
        return
    if ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(out.resolve()):
        return  # resuming in place: the run continues its own files
    raise BRPGInputError(
        f"run directory '{out}' already holds a run ({', '.join(found)}); pass overwrite=true to replace it, "
        f"ckpt_path={out / 'checkpoints' / 'last.ckpt'} to resume it, or another hydra.run.dir"
    )


def check_run_dir_overrides(argv: list[str]) -> None:
    """:func:`check_run_dir` for a ``hydra.run.dir=<dir>`` given on the command line, before Hydra writes into
    it. A multirun (``-m``) and a directory with an interpolation are left to the check in ``train``.

    >>> check_run_dir_overrides(["seed=1", "hydra.run.dir=/no/such/run"])
    """
    if "-m" in argv or "--multirun" in argv:
        return
    values: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        values[key.lstrip("+~").strip()] = value.strip().strip("'\"")
    run_dir = values.get("hydra.run.dir")
    if not run_dir or "${" in run_dir:
        return
    ckpt = values.get("ckpt_path")
    check_run_dir(run_dir, None if ckpt in (None, "", "null") else ckpt, values.get("overwrite", "").lower() in TRUE)


def check_writable_folder(folder: str | Path, key: str = "output", given: str | Path | None = None) -> None:
    """Refuse, before any work, a folder that cannot hold new files: it exists as a file, a parent is a file, it
    lies in ``/proc``, on a read-only mount or without write permission. Tried for real (permission bits alone
    do not tell: root ignores them, a read-only mount does not): the missing folders are created, a temporary
    file is written and removed, then the folders this check created are removed again, so a later refusal
    leaves nothing behind. The one-line error names ``key`` with its value (``given``: a file to be written in
    ``folder``; default the folder itself), the folder and the operating system's reason."""
    import tempfile

    folder = Path(folder)
    named = f"{key}={given if given is not None else folder}"
    where, wanted = ("there", "folder") if given is None else (f"into {folder}", "path")
    if folder.exists() and not folder.is_dir():
        raise BRPGInputError(f"{named}: {folder} exists and is not a folder; pass {key}=<a writable {wanted}>")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".brpg-write-check-"):
            pass
    except OSError as exc:
        raise BRPGInputError(
            f"{named}: cannot write {where} ({exc.strerror or exc}); pass {key}=<a writable {wanted}>"
        ) from None
    finally:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break
