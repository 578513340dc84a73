"""DPT on a patch-14 ViT (DINOv2, UniMatch V2's network) from segmentation-models-pytorch's parts.

smp 0.6's ``DPT`` sizes its reassemble stages from the encoder's stride (``stride / 4, / 8, / 16, / 32``),
which for patch 14 gives the factors 3.5, 1.75, 0.875, 0.4375 and fusion maps that do not line up (the
forward fails). DPT itself (and UniMatch V2's ``DPTHead``, after Depth Anything) treats the token grid as
a stride-16 grid whatever the patch: the four maps are resized by 4, 2, 1 and 1/2, fused coarse to fine
with an upsampling by 2 per stage, so the fused map has 8 cells per token. Here smp's ``DPTDecoder`` is
built with that nominal stride 16 (:class:`PatchDPTDecoder`) and its fused map is resized bilinearly
(``align_corners=True``, as UniMatch V2 resizes its output) to ``patch / 2`` cells per token, the finest
integer stride: **stride 2** for patch 14 (a no-op for patch 16).

:class:`PatchEncoder` runs timm's ``forward_intermediates`` on the blocks smp picks (``[2, 5, 8, 11]`` for
12 blocks, UniMatch V2's ``intermediate_layer_idx`` for small and base) with the final norm applied (DINOv2's
``get_intermediate_layers(norm=True)``), and returns the maps only: the class token is not read
(UniMatch V2's ``use_clstoken=False``, smp's ``decoder_readout="ignore"``). Returning a plain list keeps the
``Segmentor(perturb=...)`` seam of UniMatch's feature dropout unchanged.

Input sizes: smp's fusion upsamples by exactly 2, so the token grid must be even when the fourth stage
(stride-2 conv) is used: inputs are padded to a multiple of ``2 * patch`` = 28 (518 -> 532).
"""

from __future__ import annotations

import torch.nn.functional as F
from segmentation_models_pytorch.base.initialization import initialize_decoder
from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder
from torch import Tensor, nn

NOMINAL_STRIDE = 16
"""The token-grid stride DPT's reassemble factors assume (4, 2, 1, 1/2 for four stages)."""


class PatchEncoder(nn.Module):
    """The timm ViT of smp's ``TimmViTEncoder`` returning its normed intermediate maps ``(B, C, h, w)``.

    The timm network stays under ``model.`` as in smp's encoder, so ``model.weights_path`` files (a timm
    or the official DINOv2 state dict) load by the same names (:mod:`~brpg_lightning.models.weights`).

    Attributes:
        output_stride: the patch size.
        input_multiple: what the inputs must be a multiple of: ``2 * patch`` with four stages (even grid).
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.model: nn.Module = vit.model
        self.indices: list[int] = list(vit._output_indices)
        self.out_channels: list[int] = list(vit.out_channels)
        self.output_stride = int(vit.output_stride)
        self.input_multiple = self.output_stride * (2 if len(self.indices) >= 4 else 1)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(x, indices=self.indices, norm=True, intermediates_only=True)


class PatchDPTDecoder(nn.Module):
    """smp's ``DPTDecoder`` at the nominal stride 16, its fused map resized to stride 2 of the input."""

    def __init__(self, encoder: PatchEncoder, smp_decoder: nn.Module) -> None:
        super().__init__()
        blocks = smp_decoder.reassemble_blocks
        self.dpt = DPTDecoder(
            encoder_out_channels=encoder.out_channels,
            encoder_output_strides=[NOMINAL_STRIDE] * len(encoder.out_channels),
            encoder_has_prefix_tokens=False,
            readout="ignore",
            intermediate_channels=[b.project_to_out_channel.out_channels for b in blocks],
            fusion_channels=smp_decoder.fusion_blocks[0].project.out_channels,
        )
        initialize_decoder(self.dpt)
        self.cells_per_token = encoder.output_stride // 2  # stride 2 of the input

    def forward(self, features: list[Tensor]) -> Tensor:
        fused = self.dpt(features, [None] * len(features))
        h, w = features[0].shape[-2:]
        size = (h * self.cells_per_token, w * self.cells_per_token)
        if tuple(fused.shape[-2:]) == size:
            return fused
        return F.interpolate(fused, size=size, mode="bilinear", align_corners=True)


def patch_dpt(model: nn.Module) -> None:
    """Replace the encoder and decoder of an smp ``DPT`` in place by :class:`PatchEncoder` /
    :class:`PatchDPTDecoder`."""
    encoder = PatchEncoder(model.encoder)
    model.decoder = PatchDPTDecoder(encoder, model.decoder)
    model.encoder = encoder
