"""Lightning's start-up lines: the tips and absent-accelerator lines go, the device line stays."""

from __future__ import annotations

import logging

import pytorch_lightning as pl

import brpg_lightning  # noqa: F401  (installs the filter, as every entry point does)


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_trainer_start_up_prints_the_device_line_but_no_tips(tmp_path) -> None:  # noqa: ANN001
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    keep, level = _Keep(), logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        pl.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    assert any(line.startswith("GPU available: ") for line in keep.lines), keep.lines
    assert not [line for line in keep.lines if "Tip" in line or line.startswith(("TPU available: False",
                                                                                  "HPU available: False"))]
