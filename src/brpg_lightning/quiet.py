"""Drop Lightning's start-up lines that say nothing about the run: product tips and absent accelerators.

Lightning logs, once per ``Trainer``, "💡 Tip: ... try installing litlogger / litmodels" (advertising, the same
every run) and "TPU available: False ..." / "HPU available: False ..." (hardware this project never uses). They
are dropped on Lightning's rank-zero loggers only, by their exact beginnings, so every other line stays. Kept on
purpose: "GPU available: ..., used: ..." (which device this run trained on: worth having in ``train.log``), the
"GPU available but not used" warning and every line about TPUs/HPUs that are present.
"""

from __future__ import annotations

import logging

NOISE = ("💡 Tip:", "TPU available: False", "HPU available: False")
"""Beginnings of the messages dropped."""

LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
"""Where ``rank_zero_info`` logs (a logger's filters see only records created on it, not its children's)."""


class LightningNoiseFilter(logging.Filter):
    """Rejects records whose message starts with one of :data:`NOISE`.

    Example:
        >>> f = LightningNoiseFilter()
        >>> f.filter(logging.makeLogRecord({"msg": "💡 Tip: try litlogger"}))
        False
        >>> f.filter(logging.makeLogRecord({"msg": "GPU available: False, used: False"}))
        True
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


def install() -> None:
    """Add one :class:`LightningNoiseFilter` to each of :data:`LOGGERS` (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, LightningNoiseFilter) for f in logger.filters):
            logger.addFilter(LightningNoiseFilter())
