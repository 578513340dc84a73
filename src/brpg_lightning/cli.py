"""Turning user-input errors into one line on stderr and a non-zero exit code; SIGTERM into exit 143, Ctrl-C
(SIGINT) into 130."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

from brpg_lightning.errors import BRPGRunError, input_error_in

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
    """Print ``error: <message>`` on stderr and exit with ``code`` (:class:`ErrorExit`)."""
    line = f"error: {message}"
    print(line, file=sys.stderr, flush=True)
    raise ErrorExit(code, line)


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
                raise
            fail(EXIT_BAD_INPUT, str(cause))

    return wrapper
