"""BatchNorm folded into the preceding convolutions, so exported graphs hold no BatchNorm."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .graphs import ExportError


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with each ``BatchNorm2d`` folded into its convolution.

    Every ``Conv2d`` directly followed by a ``BatchNorm2d`` inside an ``nn.Sequential`` becomes
    one convolution with the running statistics and affine parameters baked into its weight and
    bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``); the BatchNorm becomes ``nn.Identity``.
    The input module is not modified. Raises ``ExportError`` if a BatchNorm is left unfolded.
    """
    folded = copy.deepcopy(module).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    left = [name for name, m in folded.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ExportError(f"BatchNorm layers not preceded by a Conv2d cannot be folded: {left}")
    return folded
