"""Small building blocks shared by both VAEs (TAESD style: a ``conv`` helper and a ``ResBlock``).

Only operators that export cleanly to ONNX and TensorRT are used: ``Conv2d``, ``BatchNorm2d``
(folded into the convolution at export), ``GroupNorm``, ``ReLU``/``SiLU``, nearest-neighbour
``Upsample``, ``Sigmoid`` and additions.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

Norm = Literal["batch", "group"]


def norm_layer(kind: Norm, channels: int) -> nn.Module:
    """``BatchNorm2d`` (fast, foldable at export) or ``GroupNorm`` (stable at small batch)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(num_groups=math.gcd(32, channels), num_channels=channels)


def activation(kind: Norm) -> nn.Module:
    """The student (batch norm) uses ReLU for speed; the teacher (group norm) uses SiLU."""
    return nn.ReLU(inplace=True) if kind == "batch" else nn.SiLU()


def conv(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    """A same-padded convolution: ``(B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)``."""
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias)


def conv_norm_act(in_ch: int, out_ch: int, norm: Norm, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, normalisation, activation."""
    return nn.Sequential(conv(in_ch, out_ch, stride=stride, bias=False), norm_layer(norm, out_ch),
                         activation(norm))


class ResBlock(nn.Module):
    """Pre-activation-free residual block: ``x + norm(conv(act(norm(conv(x)))))``, then act.

    Keeps shape: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, norm: Norm) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(channels, channels, bias=False), norm_layer(norm, channels), activation(norm),
            conv(channels, channels, bias=False), norm_layer(norm, channels),
        )
        self.act = activation(norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


def upsample(in_ch: int, out_ch: int, norm: Norm) -> nn.Sequential:
    """Nearest-neighbour x2 upsampling then a 3x3 conv: ``(B, in, H, W) -> (B, out, 2H, 2W)``."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         conv_norm_act(in_ch, out_ch, norm))
