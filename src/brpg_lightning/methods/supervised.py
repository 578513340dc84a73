"""SupOnly: the student trained on labeled images alone (paper Table 6, row I)."""

from __future__ import annotations

from typing import Any

from brpg_lightning.methods.base import SegmentationModule
from brpg_lightning.methods.context import TrainStepContext


class Supervised(SegmentationModule):
    """L = L_s (Eq. 2). Evaluated with the student's classification head."""

    uses_unlabeled = False

    def compute_step(self, batch: dict[str, Any]) -> TrainStepContext:
        labeled = batch["labeled"]
        out_l = self.student(labeled["image"])
        ctx = self.new_context(out_l, labeled["mask"])
        ctx.add_loss("L_s", self.supervised_loss(out_l, labeled["mask"]))
        return ctx
