"""Networks evaluated together: CPS's ``eval_on=mean`` averages the logits of its two networks."""

from __future__ import annotations

from torch import Tensor, nn

from brpg_lightning.models.output import SegmentorOutput


class MeanLogits(nn.Module):
    """Segmentors of one architecture on the same input; logits averaged (at the decoder resolution, which
    equals averaging the upsampled logits: bilinear upsampling is linear), features and decoder map of the first.

    ``checkpoint.build_eval_network`` rebuilds it from a checkpoint whose ``inference`` block lists several
    ``eval_prefixes``, so ``predict`` and ``export`` run what training validated.
    """

    def __init__(self, *members: nn.Module) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("MeanLogits needs at least two networks")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.pad_multiple = int(getattr(first, "pad_multiple", 1))
        self.stride = int(getattr(first, "stride", 1))
        self.align_corners = bool(getattr(first, "align_corners", False))

    def forward(self, x: Tensor) -> SegmentorOutput:
        outs = [m(x) for m in self.members]
        logits = outs[0].logits
        for out in outs[1:]:
            logits = logits + out.logits
        first = outs[0]
        return SegmentorOutput(logits / len(outs), first.features, first.decoder, first.stride,
                               align_corners=first.align_corners)
