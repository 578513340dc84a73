"""Turning user-input errors into one line on stderr and a non-zero exit code; SIGTERM into exit 143, Ctrl-C
(SIGINT) into 130.

In a multi-process run (DDP) the line is printed once, by the first rank that fails (it creates the run's
:data:`RANK_ERROR_FILE` exclusively), and every rank leaves at once with ``os._exit``: a rank waiting in a
collective for the failed one gets gloo's "connection closed" error, which is then not a second failure but the
same one, and ends silently with the same exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

from brpg_lightning.errors import BRPGRunError, input_error_in

RANK_ERROR_FILE: Path | None = None
"""``<run directory>/.rank-error`` while a multi-process fit runs (set by ``train.train`` on every rank, None
otherwise): the exit status and error line of the rank that failed first."""

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 3
"""The run did not do what was asked: a non-finite loss stopped it, it stopped early for no stated reason, or a
checkpoint it reports does not exist (:class:`~brpg_lightning.errors.BRPGRunError`)."""
EXIT_PREEMPTED = 143
"""128 + SIGTERM: the run was pre-empted after writing ``checkpoints/preempted.ckpt``."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT: Ctrl-C stopped the run at a batch boundary after writing ``checkpoints/preempted.ckpt``."""


class ErrorExit(SystemExit):
    """``SystemExit(code)`` that also carries the one ``error:`` line printed (a multirun lists it at the end)."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(code)
        self.line = line


def fail(code: int, message: str) -> None:
    """Print ``error: <message>`` on stderr and exit with ``code`` (:class:`ErrorExit`). In a multi-process run: only
    when no other rank reported first, then ``os._exit(code)`` (:func:`leave_ranks`)."""
    line = f"error: {message}"
    if RANK_ERROR_FILE is not None:
        leave_ranks(code, line)
    print(line, file=sys.stderr, flush=True)
    raise ErrorExit(code, line)


def leave_ranks(code: int, line: str) -> None:
    """This rank's failure in a multi-process run: the first rank to fail records ``code`` and ``line`` in
    :data:`RANK_ERROR_FILE` (created exclusively) and prints the line; a later one prints nothing. Then the
    process ends at once (``os._exit``, after flushing): Lightning's teardown and the interpreter's exit would
    wait on, or fail against, the ranks that are gone."""
    assert RANK_ERROR_FILE is not None
    try:
        with open(RANK_ERROR_FILE, "x") as fh:
            fh.write(f"{code}\n{line}\n")
        print(line, file=sys.stderr)
    except FileExistsError:
        pass  # another rank said it
    except OSError:
        print(line, file=sys.stderr)  # no record possible: better twice than never
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def peer_failure() -> int | None:
    """The exit status another rank recorded in :data:`RANK_ERROR_FILE`, None when none did."""
    if RANK_ERROR_FILE is None:
        return None
    try:
        return int(RANK_ERROR_FILE.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def exit_on_bad_input(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn``; a :class:`BRPGInputError` (also when wrapped by Hydra/OmegaConf) prints one line, exits 2.

    Lightning's ``SIGTERMException`` (raised after a SIGTERM, once the pre-emption checkpoint is written)
    prints one line naming the checkpoint and exits with :data:`EXIT_PREEMPTED` (:data:`EXIT_INTERRUPTED` after
    Ctrl-C); a :class:`BRPGRunError` prints one line and exits with
    :data:`EXIT_RUN_FAILED`.
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SIGTERMException as exc:
            checkpoint = getattr(exc, "checkpoint", None)
            resume = (f"; resume with ckpt_path={checkpoint}" if checkpoint is not None
                      else "; see the log for the checkpoint to resume from")
            if getattr(exc, "signal_name", "SIGTERM") == "SIGINT":
                fail(EXIT_INTERRUPTED, f"interrupted (SIGINT){resume}")
            fail(EXIT_PREEMPTED, f"pre-empted (SIGTERM){resume}")
        except BRPGRunError as exc:
            fail(EXIT_RUN_FAILED, str(exc))
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is (caused by) bad input
            cause = input_error_in(exc)
            if cause is None:
                peer = peer_failure()
                if peer is None:
                    raise
                # a collective broken by a rank that failed and said why: the same failure, said once
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(peer)
            fail(EXIT_BAD_INPUT, str(cause))

    return wrapper
