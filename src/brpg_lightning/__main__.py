"""``python -m brpg_lightning [overrides]``: the only ``@hydra.main`` of the project (training).

A multirun (``-m``) runs every job even when some fail: a failing job's error is recorded (its one ``error:``
line, or the exception's, with the traceback in the job's log) and the next job starts; at the end the failed
jobs are listed and the exit status is non-zero (2 when every failure was bad input). Ctrl-C and SIGTERM stop
the whole sweep, as in a single run.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import hydra
from omegaconf import DictConfig

from brpg_lightning.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_PREEMPTED, ErrorExit, exit_on_bad_input
from brpg_lightning.config import check_renamed_overrides, config_dir, register_resolvers
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.run_dir import check_run_dir_overrides

register_resolvers()
log = logging.getLogger(__name__)

EXIT_JOBS_FAILED = 1
"""A multirun whose failed jobs did not all fail on bad input."""


@dataclass(frozen=True)
class JobFailure:
    """A multirun job that failed: its number, its run directory, its error line and exit status."""

    num: int
    output_dir: str
    error: str
    code: int


FAILURES: list[JobFailure] = []
"""Failed jobs of this process's multirun (Hydra's basic launcher runs the jobs one after another in it)."""
JOBS: dict[int, tuple[str, ...]] = {}
"""The overrides of every multirun job started in this process, by job number."""


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def train_main(cfg: DictConfig) -> float:
    from brpg_lightning.train import run  # heavy imports after Hydra parsed the command line

    task = exit_on_bad_input(run)
    if not in_multirun():
        return task(cfg)
    return run_job(task, cfg)


def run_job(task, cfg: DictConfig) -> float:  # noqa: ANN001 - the wrapped task
    """One multirun job: its failure is recorded and answered with NaN (the sweep goes on; an optimising sweeper
    sees a failed trial); an interruption (Ctrl-C, SIGTERM) still stops the sweep."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    job = hydra_cfg.job
    JOBS[int(job.num)] = tuple(hydra_cfg.overrides.task)
    try:
        return task(cfg)
    except ErrorExit as exc:
        if exc.code in (EXIT_INTERRUPTED, EXIT_PREEMPTED):
            raise
        error, code = exc.line, int(exc.code)
    except Exception as exc:  # noqa: BLE001 - any failure of one job: recorded, the others still run
        log.exception("job %s failed", job.num)
        error, code = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", EXIT_JOBS_FAILED
    FAILURES.append(JobFailure(int(job.num), str(hydra_cfg.runtime.output_dir), error, code))
    return float("nan")


def report_failures() -> int:
    """The failed jobs on stderr, one line each after a header (the job's own overrides, those the jobs do not all
    share, its run directory and its error); the exit status: 0 when none failed, 2 when every failure was bad
    input, else 1."""
    if not FAILURES:
        return 0
    shared = set.intersection(*(set(o) for o in JOBS.values())) if len(JOBS) > 1 else set()
    print(f"multirun: {len(FAILURES)} of {len(JOBS)} jobs failed (the others ran to their end):", file=sys.stderr)
    for failure in FAILURES:
        own = " ".join(o for o in JOBS.get(failure.num, ()) if o not in shared)
        print(f"  job {failure.num} ({own or 'no overrides'}; {failure.output_dir}): {failure.error}", file=sys.stderr)
    return EXIT_BAD_INPUT if all(f.code == EXIT_BAD_INPUT for f in FAILURES) else EXIT_JOBS_FAILED


def main() -> float:
    """Renamed keys first (``optim.lr`` -> ``optim.optimizer.lr``): one line instead of Hydra's "Could not override";
    then a ``hydra.run.dir`` that holds another run, before Hydra writes its ``.hydra/`` into it. After a multirun,
    the jobs that failed."""
    try:
        check_renamed_overrides(sys.argv[1:])
        check_run_dir_overrides(sys.argv[1:])
    except BRPGInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    result = train_main()
    status = report_failures()
    if status:
        sys.exit(status)
    return result


if __name__ == "__main__":
    main()
