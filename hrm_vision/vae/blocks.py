"""Small building blocks shared by both VAEs (TAESD style: a ``conv`` helper and a ``ResBlock``).

Only operators that export cleanly to ONNX and TensorRT are used: ``Conv2d``, ``ReLU``,
``PixelShuffle``/``PixelUnshuffle`` (ONNX DepthToSpace/SpaceToDepth), additions and ``Clip``.
There is no normalisation layer: every nonlinear branch ends in a convolution that starts at
zero (SkipInit, De and Smith, 2020), so each model starts as its linear patch path and the
branches learn the residual; without normalisation there is nothing to fold at export and no
train/eval difference. ``docs/models.md`` has the measurements behind the design.
"""

from __future__ import annotations

from torch import Tensor, nn


def conv(in_ch: int, out_ch: int, kernel: int = 3, bias: bool = True) -> nn.Conv2d:
    """A same-padded stride-1 convolution: ``(B, in_ch, H, W) -> (B, out_ch, H, W)``."""
    return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=bias)


def zero_conv(in_ch: int, out_ch: int, kernel: int = 3) -> nn.Conv2d:
    """A :func:`conv` whose weight and bias start at zero (the end of a residual branch)."""
    layer = conv(in_ch, out_ch, kernel)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """Pre-activation residual block ``x + conv(relu(conv(relu(x))))``; keeps (B, C, H, W).

    The second convolution starts at zero, so the block starts as the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), conv(channels, channels), nn.ReLU(),
                                  zero_conv(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def down(in_ch: int, out_ch: int, kernel: int = 1) -> nn.Sequential:
    """Lossless x2 downsampling (PixelUnshuffle) then a convolution:
    ``(B, in, H, W) -> (B, out, H/2, W/2)``; no pixel is dropped before the network sees it."""
    return nn.Sequential(nn.PixelUnshuffle(2), conv(4 * in_ch, out_ch, kernel))


def up(in_ch: int, out_ch: int) -> nn.Sequential:
    """Sub-pixel x2 upsampling (Shi et al., 2016): a 1x1 convolution to ``4 * out`` channels,
    then PixelShuffle: ``(B, in, H, W) -> (B, out, 2H, 2W)``."""
    return nn.Sequential(conv(in_ch, 4 * out_ch, kernel=1), nn.PixelShuffle(2))


def clamp01(x: Tensor, straight_through: bool = False) -> Tensor:
    """``x`` clamped to [0, 1]. With ``straight_through`` (training) the value is clamped but
    the gradient is the identity's, so a pixel that overshoots still learns; without it (eval,
    export) this is a plain ``clamp`` (ONNX ``Clip``)."""
    if straight_through:
        return x + (x.clamp(0.0, 1.0) - x).detach()
    return x.clamp(0.0, 1.0)
