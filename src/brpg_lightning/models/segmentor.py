"""Encoder-decoder segmentor with a classification head and a feature head (paper Sec. 3.3, 4.1.3).

The encoder ``E`` and decoder come from ``segmentation_models_pytorch`` (DeepLabV3+, SegFormer or DPT); smp's
own segmentation/classification heads are dropped (unused parameters would upset DDP). Two heads read
the decoder map at its own resolution (1/4 of the input for DeepLabV3+ and SegFormer; for DPT on a patch-14
DINOv2 the fused map of the last fusion block, before smp's segmentation head, at 1/2 of the input,
:mod:`~brpg_lightning.models.dpt`): the classification head ``F`` (``logits``) and the feature head ``G``
(``features``, 256-d in the paper).

Hand-written here only what smp/timm lack: multi-grid dilation of the last ResNet stage (U2PL's
``multi_grid``, :func:`apply_multi_grid`) and a one-line error when pretrained weights cannot be fetched
offline (:func:`create_smp_model`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.dpt import patch_dpt
from brpg_lightning.models.heads import HEAD_KINDS, build_head
from brpg_lightning.models.output import SegmentorOutput
from brpg_lightning.models.weights import load_encoder_weights

OFFLINE_HINT = (
    "offline, either put the encoder weights in a local file and set model.weights_path=<file> "
    "(safetensors or a state dict), or train from scratch with model.encoder_weights=null"
)


def create_smp_model(arch: str, encoder_name: str, encoder_weights: str | None, **kwargs) -> nn.Module:
    """``smp.create_model``; a failed weight download becomes one :class:`BRPGInputError` line.

    smp/timm fetch ``encoder_weights="imagenet"`` from the network (timm: the Hugging Face hub) on
    first use and cache them; without a network the hub client raises an ``OSError`` subclass deep in
    the call. That error is reported with both offline options (:data:`OFFLINE_HINT`).
    """
    weights: str | bool | None = encoder_weights
    if encoder_name.startswith("tu-") and weights is not None:
        weights = True  # timm picks the pretrained tag from the name (``tu-<model>.<tag>``), e.g. ImageNet-1k
    try:
        return smp.create_model(arch, encoder_name=encoder_name, encoder_weights=weights, **kwargs)
    except Exception as exc:  # noqa: BLE001 - only network failures are translated, the rest re-raised
        if encoder_weights is None or not _is_network_error(exc):
            raise
        raise BRPGInputError(
            f"model.encoder_weights={encoder_weights}: cannot download the {encoder_name} weights "
            f"({type(exc).__name__}); {OFFLINE_HINT}"
        ) from None


def _is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` or one of its causes is a connection / hub / file-not-cached failure."""
    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, (OSError, ConnectionError, TimeoutError)) or any(
            key in name for key in ("Connection", "Timeout", "HTTP", "Offline", "EntryNotFound", "URLError")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def apply_multi_grid(encoder: nn.Module, grids: list[int] | tuple[int, ...]) -> list[int]:
    """Multiply the 3x3 dilation of block ``i`` of the last ResNet stage by ``grids[i]``; new dilations.

    U2PL's ResNet (``_make_layer(..., multi_grid=True)``, grids ``[2, 2, 4]``) on top of torchvision's
    dilation rule, which timm's ``output_stride=8`` follows too: at output stride 8 the last stage's
    blocks have dilations ``(2, 4, 4)`` and multi-grid makes them ``(2*2, 4*2, 4*4) = (4, 8, 16)``.
    Padding grows with the dilation, so every map keeps its size. Neither timm nor smp has a multi-grid
    option, hence this function. Works on timm ResNets (``tu-`` encoders, ``encoder.model.layer4``)
    and smp's own ResNet encoders (``encoder.layer4``) with bottleneck blocks.
    """
    stage = getattr(getattr(encoder, "model", encoder), "layer4", None)
    blocks = list(stage.children()) if stage is not None else []
    if not blocks or not all(hasattr(b, "conv2") and hasattr(b, "conv3") for b in blocks):
        raise BRPGInputError(
            f"model.multi_grid={list(grids)}: needs a ResNet encoder with bottleneck blocks "
            f"(e.g. tu-resnet101s), got {type(getattr(encoder, 'model', encoder)).__name__}"
        )
    if len(grids) != len(blocks):
        raise BRPGInputError(
            f"model.multi_grid={list(grids)} has {len(grids)} entries; the last stage has {len(blocks)} blocks"
        )
    dilations = []
    for block, grid in zip(blocks, grids, strict=True):
        conv: nn.Conv2d = block.conv2
        d = int(conv.dilation[0]) * int(grid)
        conv.dilation = (d, d)
        conv.padding = (d * (conv.kernel_size[0] - 1) // 2, d * (conv.kernel_size[1] - 1) // 2)
        dilations.append(d)
    return dilations


def required_input_multiple(model: nn.Module) -> int:
    """The input-size multiple smp's ``SegmentationModel.check_input_shape`` demands of ``model``.

    That check uses ``encoder.output_stride`` (already reduced to 16 or 8 when the encoder is dilated,
    e.g. DeepLabV3+'s ``encoder_output_stride``; 32 for a 5-level encoder such as MiT), and nothing
    for architectures with ``requires_divisible_input_shape = False``; a ViT encoder for DPT states its own
    (:attr:`~brpg_lightning.models.dpt.PatchEncoder.input_multiple`: an even grid of patches).
    """
    if not getattr(model, "requires_divisible_input_shape", True):
        return 1
    return int(getattr(model.encoder, "input_multiple", model.encoder.output_stride))


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
        arch: smp architecture (``"deeplabv3plus"``, ``"segformer"``, ``"dpt"`` (timm ViT encoders
            ``tu-vit_*``, patch 14 or 16; :mod:`~brpg_lightning.models.dpt`), ...).
        encoder_name: smp encoder (``"resnet101"``, ``"mit_b4"``, ``"tu-vit_small_patch14_dinov2"``, ...).
        encoder_weights: smp pretrained weights (``"imagenet"``; for ``tu-`` timm encoders the default
            pretrained tag of the name, or ``tu-<model>.<tag>``) or ``None`` (random init, no download).
            Ignored when ``weights_path`` is set (the local file replaces the download).
        feature_dim: ``D``, output channels of the feature head (256 in the paper).
        head: ``"conv"`` (two Conv-BN-ReLU-Dropout blocks, DeepLabV3+) or ``"linear"``
            (Linear-Dropout-Linear, SegFormer); see :mod:`brpg_lightning.models.heads`.
        head_channels: hidden width of both heads; default: the decoder's channels.
        head_dropout: dropout probability inside both heads.
        multi_grid: per-block multipliers of the last ResNet stage's dilation (U2PL: ``[2, 2, 4]`` at
            output stride 8); ``None`` leaves timm's dilations (:func:`apply_multi_grid`).
        weights_path: a local file of encoder weights (safetensors or a state dict), loaded after the
            build (:func:`~brpg_lightning.models.weights.load_encoder_weights`; one summary line is logged).
        pad_multiple: inputs are zero-padded bottom/right to a multiple of this; default: the
            least common multiple of what the encoder requires (:func:`required_input_multiple`) and
            the decoder stride.
        align_corners: the geometry of every read of its maps at input resolution (losses, pseudo-labels,
            BRPG's points, evaluation, export), carried by each :class:`SegmentorOutput`: True (default) is
            the official code's ``F.interpolate(..., size=(H, W), align_corners=True)``, False bilinear by
            the exact stride (:func:`~brpg_lightning.models.output.resize_to_input`). Checkpoints written
            before the option existed were trained with False and load with it.
        freeze_encoder: UniMatch V2's ``lock_backbone``: the encoder's parameters get ``requires_grad=False``
            (so :meth:`param_groups` leaves them out of the optimiser) and the encoder stays in eval mode
            (BatchNorm statistics fixed, dropout off) whatever :meth:`train` is asked; the EMA teacher, a
            deep copy, inherits both.
        **arch_kwargs: passed to ``smp.create_model`` (``decoder_channels``, ``encoder_output_stride``,
            ``decoder_segmentation_channels``, ...).

    Attributes:
        stride: input pixels per decoder pixel (4 for DeepLabV3+ and SegFormer, 2 for DPT on patch 14),
            measured at build.
        decoder_channels: channels of the decoder map, measured at build.
        align_corners: the geometry its outputs carry (the argument).
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
        multi_grid: list[int] | tuple[int, ...] | None = None,
        align_corners: bool = True,
        freeze_encoder: bool = False,
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
        # a local file replaces the download (the offline route): no hub access when weights_path is set
        download = None if weights_path is not None else encoder_weights
        model = create_smp_model(arch, encoder_name, download, classes=num_classes, **arch_kwargs)
        if arch.lower() == "dpt":
            patch_dpt(model)  # patch-14 geometry; the feature head reads the fused map (stride 2)
        self.encoder: nn.Module = model.encoder
        self.multi_grid_dilations = apply_multi_grid(self.encoder, multi_grid) if multi_grid else None
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
        self.align_corners = bool(align_corners)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        hidden = head_channels or self.decoder_channels
        self.classifier = build_head(head, self.decoder_channels, hidden, num_classes, head_dropout)
        self.feature_head = build_head(head, self.decoder_channels, hidden, feature_dim, head_dropout)
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> Segmentor:
        """``nn.Module.train``; a frozen encoder (``freeze_encoder``) stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(
        self, x: Tensor, perturb: Callable[[list[Tensor]], list[Tensor]] | None = None
    ) -> SegmentorOutput:
        """Run ``E``, the decoder and both heads on ``x`` ``(B, 3, H, W)``, any ``H, W``.

        ``x`` is zero-padded bottom/right to a multiple of :attr:`pad_multiple`, and every map is
        cropped back to ``(ceil(H / stride), ceil(W / stride))``, so that
        upsampling (:meth:`SegmentorOutput.logits_at`) reads the un-padded maps only.
        In eval mode the feature head runs only when ``features`` is first read (:meth:`_lazy_features`).

        ``perturb`` (optional) maps the encoder's list of feature maps to the list the decoder reads: the
        feature perturbations of UniMatch (dropout on the encoder features, ``methods/unimatch.py``) act
        between encoder and decoder, which no module boundary exposes otherwise. It may change the batch
        size (UniMatch V1 decodes the clean and the dropped copies in one pass); every output has its batch.
        """
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.pad_multiple, -width % self.pad_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        encoded = self.encoder(x)
        if perturb is not None:
            encoded = perturb(list(encoded))
        decoded = self.decoder(encoded)
        logits = self.classifier(decoded)
        h, w = math.ceil(height / self.stride), math.ceil(width / self.stride)
        if self.training:
            features = self.feature_head(decoded)[..., :h, :w]
        else:
            features = self._lazy_features(decoded, h, w)
        return SegmentorOutput(
            logits[..., :h, :w], features, decoded[..., :h, :w], self.stride, align_corners=self.align_corners
        )

    def _lazy_features(self, decoded: Tensor, h: int, w: int) -> Callable[[], Tensor]:
        """The eval-mode feature head, run on first access to ``SegmentorOutput.features``.

        In eval mode the head changes no state (BatchNorm reads its running statistics, dropout is
        off), so running it later gives the same tensor, as long as the parameters have not changed
        (read it within the training step, before the optimiser step or EMA update). It runs in eval
        mode and in the grad mode of the forward. Mean teacher's teacher forward and validation read
        only logits outside BRPG's sampling stage, so this skips the head there instead of computing
        features that nothing reads.
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
