"""SupOnly: the student trained on labeled images alone (paper Table 6, row I)."""

from __future__ import annotations

from typing import Any

from brpg_lightning.methods.base import SegmentationModule
from brpg_lightning.methods.context import TrainStepContext


class Supervised(SegmentationModule):
    """L = L_s (Eq. 2). Evaluated with the student's classification head."""

    uses_unlabeled = False

    def method_step(self, batch: dict[str, Any]) -> TrainStepContext:
        """Every step is the labeled-only step."""
        return self.warmup_step(batch)
