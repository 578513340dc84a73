"""Encoder-decoder segmentor with a classification head and a feature head (paper Sec. 3.3, 4.1.3).

The encoder ``E`` and decoder come from ``segmentation_models_pytorch`` (DeepLabV3+ or SegFormer); smp's
own segmentation/classification heads are dropped (unused parameters would upset DDP). Two heads read
the decoder map at its own resolution (1/4 of the input for both architectures): the classification
head ``F`` (``logits``) and the feature head ``G`` (``features``, 256-d in the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.heads import HEAD_KINDS, build_head
from brpg_lightning.models.output import SegmentorOutput
from brpg_lightning.models.weights import load_encoder_weights


def required_input_multiple(model: nn.Module) -> int:
    """The input-size multiple smp's ``SegmentationModel.check_input_shape`` demands of ``model``.

    That check uses ``encoder.output_stride`` (already reduced to 16 or 8 when the encoder is dilated,
    e.g. DeepLabV3+'s ``encoder_output_stride``; 32 for a 5-level encoder such as MiT), and nothing
    for architectures with ``requires_divisible_input_shape = False``.
    """
    if not getattr(model, "requires_divisible_input_shape", True):
        return 1
    return int(model.encoder.output_stride)


@torch.no_grad()
def _probe_decoder(
    encoder: nn.Module, decoder: nn.Module, in_channels: int, multiple: int
) -> tuple[int, int]:
    """``(decoder_channels, stride)`` from one dummy forward in eval mode (train modes restored)."""
    side = multiple * max(2, math.ceil(64 / multiple))
    size = (side, 2 * side)  # non-square, so a transposed map would be caught
    modes = [(m, m.training) for m in (*encoder.modules(), *decoder.modules())]
    encoder.eval()
    decoder.eval()
    try:
        out = decoder(encoder(torch.zeros(1, in_channels, *size)))
    finally:
        for module, training in modes:
            module.training = training
    if not isinstance(out, Tensor) or out.ndim != 4:
        raise RuntimeError(f"decoder output is not a (B, C, h, w) tensor: {type(out).__name__}")
    h, w = out.shape[-2:]
    stride = size[0] // h
    if h * stride != size[0] or w * stride != size[1]:
        raise RuntimeError(f"decoder output {(h, w)} is not the input {size} divided by an integer stride")
    return int(out.shape[1]), int(stride)


class Segmentor(nn.Module):
    """Encoder ``E``, decoder, classification head ``F`` and feature head ``G`` (Sec. 3.3).

    Args:
        num_classes: ``C``, output channels of the classification head.
        arch: smp architecture (``"deeplabv3plus"``, ``"segformer"``, ...).
        encoder_name: smp encoder (``"resnet101"``, ``"mit_b4"``, ...).
        encoder_weights: smp pretrained weights (``"imagenet"``) or ``None`` (random init, no download).
        feature_dim: ``D``, output channels of the feature head (256 in the paper).
        head: ``"conv"`` (two Conv-BN-ReLU-Dropout blocks, DeepLabV3+) or ``"linear"``
            (Linear-Dropout-Linear, SegFormer); see :mod:`brpg_lightning.models.heads`.
        head_channels: hidden width of both heads; default: the decoder's channels.
        head_dropout: dropout probability inside both heads.
        weights_path: a local file of encoder weights (safetensors or a state dict), loaded after the
            build (:func:`~brpg_lightning.models.weights.load_encoder_weights`; one summary line is logged).
        pad_multiple: inputs are zero-padded bottom/right to a multiple of this; default: the
            least common multiple of what the encoder requires (:func:`required_input_multiple`) and
            the decoder stride.
        **arch_kwargs: passed to ``smp.create_model`` (``decoder_channels``, ``encoder_output_stride``,
            ``decoder_segmentation_channels``, ...).

    Attributes:
        stride: input pixels per decoder pixel (4 for DeepLabV3+ and SegFormer), measured at build.
        decoder_channels: channels of the decoder map, measured at build.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "deeplabv3plus",
        encoder_name: str = "resnet101",
        encoder_weights: str | None = None,
        feature_dim: int = 256,
        head: str = "conv",
        head_channels: int | None = None,
        head_dropout: float = 0.1,
        pad_multiple: int | None = None,
        weights_path: str | None = None,
        **arch_kwargs,
    ) -> None:
        super().__init__()
        if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
            raise BRPGInputError(
                f"model arch {arch!r} is not one of {tuple(smp.MODEL_ARCHITECTURES_MAPPING)}"
            )
        if head not in HEAD_KINDS:
            raise BRPGInputError(f"model head {head!r} is not one of {HEAD_KINDS}")
        if num_classes < 1 or feature_dim < 1:
            raise BRPGInputError(
                f"model num_classes={num_classes} and feature_dim={feature_dim} must both be >= 1"
            )
        model = smp.create_model(
            arch,
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            classes=num_classes,
            **arch_kwargs,
        )
        self.encoder: nn.Module = model.encoder
        if weights_path is not None:
            self.weights_summary = load_encoder_weights(self.encoder, weights_path)
        self.decoder: nn.Module = model.decoder
        required = required_input_multiple(model)
        del model  # drops smp's segmentation / classification heads
        self.decoder_channels, self.stride = _probe_decoder(
            self.encoder, self.decoder, int(arch_kwargs.get("in_channels", 3)), required
        )
        minimal = math.lcm(required, self.stride)
        if pad_multiple is None:
            pad_multiple = minimal
        elif pad_multiple < 1 or pad_multiple % minimal:
            raise BRPGInputError(
                f"model pad_multiple={pad_multiple} must be a positive multiple of {minimal} "
                f"for {arch}/{encoder_name}"
            )
        self.pad_multiple: int = int(pad_multiple)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        hidden = head_channels or self.decoder_channels
        self.classifier = build_head(head, self.decoder_channels, hidden, num_classes, head_dropout)
        self.feature_head = build_head(head, self.decoder_channels, hidden, feature_dim, head_dropout)

    def forward(self, x: Tensor) -> SegmentorOutput:
        """Run ``E``, the decoder and both heads on ``x`` ``(B, 3, H, W)``, any ``H, W``.

        ``x`` is zero-padded bottom/right to a multiple of :attr:`pad_multiple`, and every map is
        cropped back to ``(ceil(H / stride), ceil(W / stride))``, so that
        :func:`~brpg_lightning.models.output.resize_to_input` restores the un-padded geometry.
        In eval mode the feature head runs only when ``features`` is first read (:meth:`_lazy_features`).
        """
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.pad_multiple, -width % self.pad_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        decoded = self.decoder(self.encoder(x))
        logits = self.classifier(decoded)
        h, w = math.ceil(height / self.stride), math.ceil(width / self.stride)
        if self.training:
            features = self.feature_head(decoded)[..., :h, :w]
        else:
            features = self._lazy_features(decoded, h, w)
        return SegmentorOutput(logits[..., :h, :w], features, decoded[..., :h, :w], self.stride)

    def _lazy_features(self, decoded: Tensor, h: int, w: int) -> Callable[[], Tensor]:
        """The eval-mode feature head, run on first access to ``SegmentorOutput.features``.

        In eval mode the head changes no state (BatchNorm reads its running statistics, dropout is
        off), so running it later gives the same tensor, as long as the parameters have not changed
        (read it within the training step, before the optimiser step or EMA update). It runs in eval
        mode and in the grad mode of the forward. Mean teacher's teacher forward and validation read
        only logits outside BRPG's sampling stage, so this skips the head there (issue 8, item 6).
        In train mode the head runs in ``forward``: its BatchNorm statistics follow every batch.
        """
        grad = torch.is_grad_enabled()
        head = self.feature_head

        def compute() -> Tensor:
            was_training = head.training
            head.eval()
            try:
                with torch.set_grad_enabled(grad):
                    return head(decoded)[..., :h, :w]
            finally:
                head.train(was_training)

        return compute

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group (Sec. 4.1.4).

        ``"backbone"``: the encoder; ``"head"``: the decoder and both heads.
        """
        head_modules = (self.decoder, self.classifier, self.feature_head)
        return {
            "backbone": [p for p in self.encoder.parameters() if p.requires_grad],
            "head": [p for m in head_modules for p in m.parameters() if p.requires_grad],
        }
