"""The two VAEs: ``TeacherVAE`` (the high-quality reference) and ``MinimalVAE`` (the TinyVAE).

Both map a (B, 3, H, W) image in [0, 1] to a spatial latent on the same H/8 x W/8 grid, so the
student-to-teacher latent adapter is a per-location 1x1 convolution. For a 32x32 image:

=========== ============ ================ ==================== ==========================
model        parameters   latent           MACs (encode+decode) design
=========== ============ ================ ==================== ==========================
TeacherVAE   ~10.1M       4x4x512          ~1.31 G              4 stages, 2 ResBlocks each,
                                                                GroupNorm + SiLU
MinimalVAE   ~1.1M        4x4x128          ~0.05 G              3 stride-2 stages, 1 ResBlock
                                                                each, BatchNorm + ReLU
=========== ============ ================ ==================== ==========================

The student does about 25x fewer multiply-accumulates than the teacher, so the MAC ratio allows
the promised 5-10x inference speed-up with room to spare; what a CPU actually delivers is lower
because thin convolutions on 4x4 and 8x8 maps use the hardware less well (see the README's
benchmark table, measured by ``python -m hrm_vision.vae.summary`` and the benchmarks).
The exact numbers are printed by ``python -m hrm_vision.vae.summary``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import VAEBase
from .blocks import Norm, ResBlock, conv, conv_norm_act, upsample


class Encoder(nn.Module):
    """``stages`` (each a ``nn.Sequential``) followed by a 1x1 ``head`` to mu and logvar."""

    def __init__(self, stages: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


class TeacherVAE(VAEBase):
    """The teacher: a 4-stage residual VAE with a 4x4x512 latent for 32x32 images (~10M params).

    Encoder stages run at full, 1/2, 1/4 and 1/8 resolution with widths
    ``base_channels * (1, 2, 4, 4)``; each stage has ``blocks_per_stage`` residual blocks with
    GroupNorm (which, unlike BatchNorm, does not degrade at small batch sizes). A 1x1 head gives
    ``latent_dim`` channels of mu and of logvar. The decoder mirrors it with nearest upsampling.

    "Latent dimension 512" is read like the student's "128": 512 channels on the H/8 x W/8 grid,
    four times the student's latent capacity, which lets the teacher reconstruct better.

    Args:
        latent_dim: latent channels (512).
        base_channels: width of the first stage (56).
        blocks_per_stage: residual blocks per stage in encoder and decoder (2).
    """

    def __init__(self, latent_dim: int = 512, base_channels: int = 56,
                 blocks_per_stage: int = 2) -> None:
        super().__init__(latent_dim)
        self._arch = {"latent_dim": latent_dim, "base_channels": base_channels,
                      "blocks_per_stage": blocks_per_stage}
        norm: Norm = "group"
        c = base_channels
        widths = [c, 2 * c, 4 * c, 4 * c]

        def blocks(ch: int) -> list[nn.Module]:
            return [ResBlock(ch, norm) for _ in range(blocks_per_stage)]

        stages: list[nn.Module] = [nn.Sequential(conv_norm_act(3, widths[0], norm),
                                                 *blocks(widths[0]))]
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=False):
            stages.append(nn.Sequential(conv_norm_act(w_in, w_out, norm, stride=2),
                                        *blocks(w_out)))
        self.encoder = Encoder(stages, conv(widths[-1], 2 * latent_dim, kernel=1))

        layers: list[nn.Module] = [conv_norm_act(latent_dim, widths[-1], norm),
                                   *blocks(widths[-1])]
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1], strict=False):
            layers += [upsample(w_in, w_out, norm), *blocks(w_out)]
        layers.append(conv(widths[0], 3))
        self.decoder = nn.Sequential(*layers)


class MinimalVAE(VAEBase):
    """The TinyVAE student: 3 stride-2 stages, latent ``(latent_dim, H/8, W/8)``, ~1.1M params.

    Encoder: a stride-2 3x3 conv straight from RGB (no full-resolution layer), then at 1/2, 1/4
    and 1/8 resolution widths ``base_channels * (1, 2, 4)`` with one residual block each, and a
    1x1 head to mu and logvar. Decoder: 1x1 in, residual blocks and nearest upsampling back up,
    a 3x3 conv to RGB logits. BatchNorm (folded into the convolutions at export) and ReLU keep
    inference cheap: almost all parameters sit on the 4x4 and 8x8 grids, where MACs are cheap.

    Args:
        latent_dim: latent channels (128: a 4x4x128 latent for a 32x32 image).
        base_channels: width of the first stage (32).
    """

    def __init__(self, latent_dim: int = 128, base_channels: int = 32) -> None:
        super().__init__(latent_dim)
        self._arch = {"latent_dim": latent_dim, "base_channels": base_channels}
        norm: Norm = "batch"
        c = base_channels
        widths = [c, 2 * c, 4 * c]

        stages: list[nn.Module] = []
        w_prev = 3
        for w in widths:
            stages.append(nn.Sequential(conv_norm_act(w_prev, w, norm, stride=2),
                                        ResBlock(w, norm)))
            w_prev = w
        self.encoder = Encoder(stages, conv(widths[-1], 2 * latent_dim, kernel=1))

        layers: list[nn.Module] = [conv_norm_act(latent_dim, widths[-1], norm),
                                   ResBlock(widths[-1], norm)]
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1], strict=False):
            layers += [upsample(w_in, w_out, norm), ResBlock(w_out, norm)]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(widths[0], 3)]
        self.decoder = nn.Sequential(*layers)


#: The name the mission uses for the student.
TinyVAE = MinimalVAE
