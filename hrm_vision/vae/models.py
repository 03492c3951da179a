"""The two VAEs: ``TeacherVAE`` (the high-quality reference) and ``MinimalVAE`` (the TinyVAE).

Both map a (B, 3, H, W) image in [0, 1] to a spatial latent on the same H/8 x W/8 grid, so the
student-to-teacher latent adapter is a per-location 1x1 convolution. Sizes for a 32x32 image:
``python -m hrm_vision.vae.summary``.

Design (residual autoencoding over a linear patch path)
-------------------------------------------------------
Each model is the sum of two paths, in the encoder and in the decoder:

* a **linear patch path**: 8x8 patches -> whitened coefficients (a fixed basis,
  :class:`~hrm_vision.vae.patches.PatchWhitening`: the DCT by default, the PCA of training
  patches after :meth:`VAEBase.init_from_data`) -> a learnable 1x1 convolution to the latent
  (initialised to keep the first ``latent_dim`` coefficients, see :func:`_spread`), and its
  mirror image in the decoder. At initialisation with a fitted PCA basis this *is* patch PCA:
  a 4x4x128 latent reconstructs 32x32 crops of photographs at about 46 dB before any training step;
* **nonlinear stages** (PixelUnshuffle downsampling, residual blocks; PixelShuffle upsampling
  on the way back) whose last convolution starts at zero, so they learn the residual the linear
  path misses instead of first learning to pass the image through.

The variance head starts at ``logvar = -4`` (posterior std 0.14 on unit-variance
coefficients), which spends about 2 nats per latent element: the default KL budget. Fitted to
data, the same total rate is re-allocated (:func:`~hrm_vision.vae.patches.allocate_rate`): the
components the decoder needs most get little noise, the faint ones the prior's spread, which is
the reverse water-filling of a Gaussian code. On the ``photos`` crops this lifts the untrained
student's decode of a posterior sample from about 30 to about 43 dB at the same KL
(``python experiments/rate_allocation.py``).
Reconstructions are clamped to [0, 1] (straight-through while training) instead of a sigmoid,
which would bend the linear path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import VAEBase
from .blocks import ResBlock, conv, down, up, zero_conv
from .patches import PATCH, PatchWhitening, allocated_logvar, fit_patch_pca, patch_vectors

#: Initial bias of the log-variance head (see the module docstring).
LOGVAR_INIT = -4.0


def _spread(latent_dim: int, coefficients: int) -> tuple[Tensor, Tensor]:
    """Initial 1x1 weights of the linear path: latent channel c carries coefficient
    ``c mod coefficients``; the decoder averages the copies of each coefficient.

    Returns (encoder weight ``(latent, coefficients, 1, 1)``, decoder weight
    ``(coefficients, latent, 1, 1)``). A latent narrower than the patch keeps the first
    coefficients; a wider one (the teacher's 512 > 192) holds the first coefficients two or
    three times, so at the same KL budget per element their copies average out the posterior
    noise.
    """
    enc = torch.zeros(latent_dim, coefficients)
    enc[torch.arange(latent_dim), torch.arange(latent_dim) % coefficients] = 1.0
    dec = enc.T / enc.sum(0).clamp(min=1)[:, None]
    return enc[:, :, None, None], dec[:, :, None, None]


class Encoder(nn.Module):
    """Image ``(B, 3, H, W)`` in [0, 1] -> ``(B, 2 * latent_dim, H/8, W/8)`` (mu, then logvar).

    ``mu = linear(patches(x)) + mu_head(stages(x))``; ``logvar = logvar_head(stages(x))``.
    ``stages`` is a ``ModuleList``; the first three each halve the resolution.
    """

    def __init__(self, widths: list[int], latent_dim: int, blocks: int) -> None:
        super().__init__()
        self.patches = PatchWhitening()
        self.linear = conv(self.patches.dim, latent_dim, kernel=1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(_spread(latent_dim, self.patches.dim)[0])
        stages: list[nn.Module] = []
        for i, w in enumerate(widths):
            if i == 0:
                entry: nn.Module = nn.Sequential(nn.PixelUnshuffle(2), conv(12, w))
            elif i < 3:
                entry = down(widths[i - 1], w)
            else:  # stages after the third stay on the H/8 grid
                entry = conv(widths[i - 1], w)
            stages.append(nn.Sequential(entry, *(ResBlock(w) for _ in range(blocks))))
        self.stages = nn.ModuleList(stages)
        self.mu_head = nn.Sequential(nn.ReLU(), zero_conv(widths[-1], latent_dim))
        self.logvar_head = nn.Sequential(nn.ReLU(), zero_conv(widths[-1], latent_dim, kernel=1))
        with torch.no_grad():
            self.logvar_head[1].bias.fill_(LOGVAR_INIT)

    def features(self, x: Tensor) -> list[Tensor]:
        """Outputs of each nonlinear stage, from ``x`` in [0, 1]."""
        h = x * 2.0 - 1.0
        feats = []
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)[-1]
        mu = self.linear(self.patches(x)) + self.mu_head(h)
        return torch.cat([mu, self.logvar_head(h)], dim=1)


class Decoder(nn.Module):
    """Latent ``(B, latent_dim, h, w)`` -> image ``(B, 3, 8h, 8w)`` (unclamped).

    ``patches(linear(z)) + out(stages(z))`` (``patches`` is the synthesis direction): stages
    mirror the encoder's (widths in reverse), the last three each double the resolution,
    ``out`` (zero at the start) brings the half-resolution features to RGB with a
    PixelShuffle.
    """

    def __init__(self, widths: list[int], latent_dim: int, blocks: int) -> None:
        super().__init__()
        self.patches = PatchWhitening(inverse=True)
        self.linear = conv(latent_dim, self.patches.dim, kernel=1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(_spread(latent_dim, self.patches.dim)[1])
        rev = widths[::-1]
        stages: list[nn.Module] = []
        for i, w in enumerate(rev):
            if i == 0:
                entry: nn.Module = conv(latent_dim, w)
            elif i < len(rev) - 2:  # extra stages stay on the H/8 grid
                entry = conv(rev[i - 1], w)
            else:
                entry = up(rev[i - 1], w)
            stages.append(nn.Sequential(entry, *(ResBlock(w) for _ in range(blocks))))
        self.stages = nn.Sequential(*stages)
        self.out = nn.Sequential(nn.ReLU(), zero_conv(widths[0], 12), nn.PixelShuffle(2))

    def forward(self, z: Tensor) -> Tensor:
        return self.patches(self.linear(z)) + self.out(self.stages(z))


class _PatchVAE(VAEBase):
    """Shared construction of both models (see the module docstring)."""

    def __init__(self, latent_dim: int, widths: list[int], blocks: int) -> None:
        super().__init__(latent_dim)
        if min(widths) < 1 or blocks < 1:
            raise ValueError(f"widths and blocks must be positive, got {widths}, {blocks}")
        self.encoder = Encoder(widths, latent_dim, blocks)
        self.decoder = Decoder(widths, latent_dim, blocks)

    @torch.no_grad()
    def init_from_data(self, images: Tensor) -> None:
        """Fit the patch basis of both paths to the PCA of ``images`` (N, 3, H, W) in [0, 1],
        then the posterior variances: the rate that ``logvar = LOGVAR_INIT`` everywhere would
        spend, allocated to the elements where the decoder needs it
        (:func:`~hrm_vision.vae.patches.allocated_logvar`)."""
        self._check_images(images)
        mean, components, variances = fit_patch_pca(images.float().cpu(), PATCH)
        for part in (self.encoder.patches, self.decoder.patches):
            part.set_basis(mean, components, variances)
        enc_w, enc_b, dec_w, _ = self.linear_path()
        logvar = allocated_logvar(enc_w, enc_b, dec_w, patch_vectors(images.float().cpu()),
                                  LOGVAR_INIT)
        self.encoder.logvar_head[1].bias.copy_(logvar.to(self.encoder.logvar_head[1].bias))

    @torch.no_grad()
    def linear_path(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The linear paths as affine maps between a flattened 8x8 patch (192 numbers in
        PixelUnshuffle order, pixels in [0, 1]) and the latent at its grid position.

        Returns ``(enc_weight (L, 192), enc_bias (L,), dec_weight (192, L), dec_bias (192,))``:
        the encoder's linear path is ``z = enc_weight @ patch + enc_bias`` and the decoder's
        ``patch = dec_weight @ z + dec_bias`` (the nonlinear branches are left out).
        """
        ea, eb = self.encoder.patches.weight[:, :, 0, 0], self.encoder.patches.bias
        el = self.encoder.linear.weight[:, :, 0, 0]
        ds, db = self.decoder.patches.weight[:, :, 0, 0], self.decoder.patches.bias
        dl = self.decoder.linear.weight[:, :, 0, 0]
        return el @ ea, el @ eb, ds @ dl, db.clone()


class TeacherVAE(_PatchVAE):
    """The teacher: a 4-stage VAE with a 4x4x512 latent for 32x32 images (~10M parameters).

    Nonlinear stages at 1/2, 1/4, 1/8 and 1/8 resolution with widths
    ``base_channels * (1, 2, 4, 5)``, ``blocks_per_stage`` residual blocks each, mirrored in the
    decoder. The linear path keeps all 192 coefficients of an 8x8 RGB patch (lossless at
    initialisation), the first 128 three times and the others twice over the 512 channels.

    Args:
        latent_dim: latent channels (512).
        base_channels: width of the first stage (64).
        blocks_per_stage: residual blocks per stage in encoder and decoder (1).
    """

    def __init__(self, latent_dim: int = 512, base_channels: int = 64,
                 blocks_per_stage: int = 1) -> None:
        super().__init__(latent_dim, [base_channels * k for k in (1, 2, 4, 5)], blocks_per_stage)
        self._arch = {"latent_dim": latent_dim, "base_channels": base_channels,
                      "blocks_per_stage": blocks_per_stage}


class MinimalVAE(_PatchVAE):
    """The TinyVAE student: 3 stages, latent ``(latent_dim, H/8, W/8)``, ~1.2M parameters.

    Nonlinear stages at 1/2, 1/4 and 1/8 resolution with widths ``base_channels * (1, 2, 4)``
    and one residual block each, mirrored in the decoder; the linear path keeps the first
    ``latent_dim`` whitened patch coefficients (the PCA's largest components after
    ``init_from_data``).

    Args:
        latent_dim: latent channels (128: a 4x4x128 latent for a 32x32 image).
        base_channels: width of the first stage (32).
    """

    def __init__(self, latent_dim: int = 128, base_channels: int = 32) -> None:
        super().__init__(latent_dim, [base_channels * k for k in (1, 2, 4)], 1)
        self._arch = {"latent_dim": latent_dim, "base_channels": base_channels}


#: Another name for the student.
TinyVAE = MinimalVAE
