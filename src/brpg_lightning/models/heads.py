"""Per-pixel heads on the decoder features (paper Sec. 4.1.3, after U2PL).

Both heads of a :class:`~brpg_lightning.models.segmentor.Segmentor` read the same decoder map and keep
its resolution: the classification head ``F`` maps to the label space, the feature head ``G`` to a
``feature_dim``-dimensional representation space (256 in the paper).
"""

from __future__ import annotations

from torch import nn

from brpg_lightning.errors import BRPGInputError

HEAD_KINDS = ("conv", "linear")
"""Head structures: ``"conv"`` for DeepLabV3+ (U2PL), ``"linear"`` for SegFormer."""


def conv_head(
    in_channels: int, hidden_channels: int, out_channels: int, dropout: float = 0.1
) -> nn.Sequential:
    """Two Conv-BN-ReLU-Dropout blocks, then a 1x1 projection (DeepLabV3+ heads, Sec. 4.1.3).

    ``[Conv3x3(c_in, c_h, bias=False) - BN - ReLU - Dropout2d(p)] x 2 - Conv1x1(c_h, out)``;
    maps ``(B, c_in, h, w)`` to ``(B, out, h, w)``.

    Example:
        >>> import torch
        >>> conv_head(8, 4, 3).eval()(torch.zeros(2, 8, 5, 7)).shape
        torch.Size([2, 3, 5, 7])
    """
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(2):
        layers += [
            nn.Conv2d(c, hidden_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        ]
        c = hidden_channels
    layers.append(nn.Conv2d(hidden_channels, out_channels, kernel_size=1, bias=True))
    return nn.Sequential(*layers)


def linear_head(
    in_channels: int, hidden_channels: int, out_channels: int, dropout: float = 0.1
) -> nn.Sequential:
    """Linear-Dropout-Linear per pixel (SegFormer heads, Sec. 4.1.3).

    ``Conv1x1(c_in, c_h) - Dropout2d(p) - Conv1x1(c_h, out)``; maps ``(B, c_in, h, w)`` to
    ``(B, out, h, w)``.

    Example:
        >>> import torch
        >>> linear_head(8, 4, 3).eval()(torch.zeros(1, 8, 2, 2)).shape
        torch.Size([1, 3, 2, 2])
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, kernel_size=1),
        nn.Dropout2d(dropout),
        nn.Conv2d(hidden_channels, out_channels, kernel_size=1),
    )


def build_head(
    kind: str, in_channels: int, hidden_channels: int, out_channels: int, dropout: float
) -> nn.Sequential:
    """The head named ``kind`` (one of :data:`HEAD_KINDS`)."""
    if kind == "conv":
        return conv_head(in_channels, hidden_channels, out_channels, dropout)
    if kind == "linear":
        return linear_head(in_channels, hidden_channels, out_channels, dropout)
    raise BRPGInputError(f"model head {kind!r} is not one of {HEAD_KINDS}")
