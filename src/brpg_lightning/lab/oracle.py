"""Mean teacher trained on the unlabeled images' true masks: the ceiling of pseudo-labelling (diagnostic)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.mean_teacher import MeanTeacher
from brpg_lightning.models.output import SegmentorOutput


class OracleMeanTeacher(MeanTeacher):
    """:class:`MeanTeacher` whose pseudo-labels are the true masks (``dataset.oracle_mask_dir``): confidence 1,
    every valid pixel kept. Everything else (teacher, CutMix, losses, BRPG) is the method's own."""

    def teacher_probabilities(self, out_t: SegmentorOutput, unlabeled: dict[str, Any], size: tuple[int, int]
                              ) -> tuple[Tensor, Tensor]:
        true = unlabeled.get("mask")
        if true is None:
            raise BRPGInputError("the oracle needs the hidden true masks: set dataset.oracle_mask_dir")
        valid = unlabeled["valid"] & (true != IGNORE_INDEX)
        one_hot = torch.nn.functional.one_hot(true.masked_fill(~valid, 0), self.num_classes)
        return one_hot.permute(0, 3, 1, 2).float(), valid

    def unsup_keep(self, filter_probs: Tensor, valid: Tensor) -> Tensor:
        return valid.clone()
