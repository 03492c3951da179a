"""Small building blocks shared by both VAEs (TAESD style: a ``conv`` helper and a ``ResBlock``).

Only operators that export cleanly to ONNX and TensorRT are used: ``Conv2d``, ``BatchNorm2d``
(folded into the convolution at export), ``ReLU``, nearest-neighbour ``Upsample``,
``PixelShuffle``/``PixelUnshuffle`` (ONNX DepthToSpace/SpaceToDepth), ``Sigmoid`` and additions.

Why BatchNorm in both models: GroupNorm (tried first for the teacher) normalises each image on
its own; on 4x4 and 8x8 maps with few channels per group it removes each image's brightness and
colour and the teacher stalled at the "predict grey" solution. BatchNorm is also free at
inference. ``python scripts/teacher_norm_ablation.py`` measures both choices of this module.
"""

from __future__ import annotations

from torch import Tensor, nn


def conv(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    """A same-padded convolution: ``(B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)``."""
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Convolution, BatchNorm, ReLU."""
    return nn.Sequential(conv(in_ch, out_ch, kernel, stride=stride, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """Residual block ``relu(x + bn(conv(relu(bn(conv(x))))))``; keeps shape (B, C, H, W).

    The last BatchNorm starts with zero scale (Goyal et al., 2017), so each block starts as the
    identity; ``scripts/teacher_norm_ablation.py`` measures what it buys the teacher.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(channels, channels, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            conv(channels, channels, bias=False), nn.BatchNorm2d(channels),
        )
        nn.init.zeros_(self.body[-1].weight)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


def upsample(in_ch: int, out_ch: int) -> nn.Sequential:
    """Nearest-neighbour x2 upsampling then conv-BN-ReLU: ``(B, in, H, W) -> (B, out, 2H, 2W)``."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv_bn_relu(in_ch, out_ch))


def space_to_depth(in_ch: int, out_ch: int, kernel: int = 1) -> nn.Sequential:
    """Lossless x2 downsampling (PixelUnshuffle) then conv-BN-ReLU: ``(B, in, H, W) ->
    (B, out, H/2, W/2)``; no pixel is dropped before the network has seen it."""
    return nn.Sequential(nn.PixelUnshuffle(2), conv_bn_relu(4 * in_ch, out_ch, kernel))


def depth_to_space(in_ch: int, out_ch: int) -> nn.Sequential:
    """Sub-pixel x2 upsampling (Shi et al., 2016): 1x1 conv to ``4 * out`` channels, then
    PixelShuffle, BN, ReLU: ``(B, in, H, W) -> (B, out, 2H, 2W)``."""
    return nn.Sequential(conv(in_ch, 4 * out_ch, kernel=1, bias=False), nn.PixelShuffle(2),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))
