"""The two VAEs: ``TeacherVAE`` (the high-quality reference) and ``MinimalVAE`` (the TinyVAE).

Both map a (B, 3, H, W) image in [0, 1] to a spatial latent on the same H/8 x W/8 grid, so the
student-to-teacher latent adapter is a per-location 1x1 convolution. For a 32x32 image:

=========== ============ ========= ====================== ===============================
model        parameters   latent    MACs (encode + decode) design
=========== ============ ========= ====================== ===============================
TeacherVAE   10.4M        4x4x512   109 M + 128 M          4 stages (PixelUnshuffle down,
                                                           PixelShuffle up), widths 64-320
MinimalVAE   1.14M        4x4x128   17 M + 27 M            3 stride-2 stages, widths 32-128
=========== ============ ========= ====================== ===============================

Both use BatchNorm (folded at export) and ReLU with zero-initialised residual blocks.
The student does 5.4x fewer multiply-accumulates than the teacher (9.1x fewer parameters): the
MAC ratio is the ceiling for a compute-bound speed-up, so it allows about 5x, the low end of
the promised 5-10x; on a CPU, thin convolutions on 4x4 and 8x8 maps use the hardware less well,
so the measured speed-up is what the README's evidence section reports. The teacher's MACs
were kept low on purpose: it must be pre-trained before every first distillation, on CPUs too.
A first teacher with full-resolution stages (955 M MACs, 22x the student) trained at 52 img/s
on 2 CPU cores against the student's 950. Numbers: ``python -m hrm_vision.vae.summary``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import VAEBase
from .blocks import ResBlock, conv, conv_bn_relu, depth_to_space, space_to_depth, upsample


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
    """The teacher: a 4-stage residual VAE with a 4x4x512 latent for 32x32 images (~10.4M params).

    Encoder stages run at 1/2, 1/4, 1/8 and 1/8 resolution with widths
    ``base_channels * (1, 2, 4, 5)``: each of the first three starts with a lossless
    space-to-depth (PixelUnshuffle) downsampling, the fourth widens at 1/8; each stage has
    ``blocks_per_stage`` residual blocks; a 1x1 head gives ``latent_dim`` channels of mu and of
    logvar. The decoder mirrors it with sub-pixel (PixelShuffle) upsampling. Most parameters sit
    on the small grids, so the teacher has ~9x the student's parameters for ~5x its MACs, and
    trains fast enough on a CPU to be pre-trained before distillation.

    "Latent dimension 512" is read like the student's "128": 512 channels on the H/8 x W/8 grid,
    four times the student's latent capacity, which lets the teacher reconstruct better.

    Args:
        latent_dim: latent channels (512).
        base_channels: width of the first stage (64).
        blocks_per_stage: residual blocks per stage in encoder and decoder (1).
    """

    def __init__(self, latent_dim: int = 512, base_channels: int = 64,
                 blocks_per_stage: int = 1) -> None:
        super().__init__(latent_dim)
        self._arch = {"latent_dim": latent_dim, "base_channels": base_channels,
                      "blocks_per_stage": blocks_per_stage}
        w1, w2, w3, w4 = (base_channels * k for k in (1, 2, 4, 5))

        def blocks(ch: int) -> list[nn.Module]:
            return [ResBlock(ch) for _ in range(blocks_per_stage)]

        self.encoder = Encoder(
            [nn.Sequential(space_to_depth(3, w1, kernel=3), *blocks(w1)),   # 1/2
             nn.Sequential(space_to_depth(w1, w2), *blocks(w2)),            # 1/4
             nn.Sequential(space_to_depth(w2, w3), *blocks(w3)),            # 1/8
             nn.Sequential(conv_bn_relu(w3, w4), *blocks(w4))],             # 1/8, wider
            head=conv(w4, 2 * latent_dim, kernel=1),
        )
        self.decoder = nn.Sequential(
            conv_bn_relu(latent_dim, w4), *blocks(w4),
            conv_bn_relu(w4, w3), *blocks(w3),
            depth_to_space(w3, w2), *blocks(w2),                             # 1/4
            depth_to_space(w2, w1), *blocks(w1),                             # 1/2
            conv(w1, 12), nn.PixelShuffle(2),                                # full size, logits
        )


class MinimalVAE(VAEBase):
    """The TinyVAE student: 3 stride-2 stages, latent ``(latent_dim, H/8, W/8)``, ~1.1M params.

    Encoder: a stride-2 3x3 conv straight from RGB (no full-resolution layer), then at 1/2, 1/4
    and 1/8 resolution widths ``base_channels * (1, 2, 4)`` with one residual block each, and a
    1x1 head to mu and logvar. Decoder: a 3x3 conv in, residual blocks and nearest upsampling,
    a 3x3 conv to RGB logits. BatchNorm (folded into the convolutions at export) and ReLU keep
    inference cheap: almost all parameters sit on the 4x4 and 8x8 grids, where MACs are cheap.

    Args:
        latent_dim: latent channels (128: a 4x4x128 latent for a 32x32 image).
        base_channels: width of the first stage (32).
    """

    def __init__(self, latent_dim: int = 128, base_channels: int = 32) -> None:
        super().__init__(latent_dim)
        self._arch = {"latent_dim": latent_dim, "base_channels": base_channels}
        c = base_channels
        widths = [c, 2 * c, 4 * c]

        stages: list[nn.Module] = []
        w_prev = 3
        for w in widths:
            stages.append(nn.Sequential(conv_bn_relu(w_prev, w, stride=2), ResBlock(w)))
            w_prev = w
        self.encoder = Encoder(stages, conv(widths[-1], 2 * latent_dim, kernel=1))

        layers: list[nn.Module] = [conv_bn_relu(latent_dim, widths[-1]), ResBlock(widths[-1])]
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1], strict=False):
            layers += [upsample(w_in, w_out), ResBlock(w_out)]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(widths[0], 3)]
        self.decoder = nn.Sequential(*layers)


#: The name the mission uses for the student.
TinyVAE = MinimalVAE
