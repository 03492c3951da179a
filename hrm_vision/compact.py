"""The compact pair: ``CompactStudentVAE`` (64 numbers per 64x64 crop) and ``CompactTeacherVAE``
(512 numbers), for pipelines that pass one short vector per crop instead of a spatial map.

Both map a crop ``(B, C, S, S)`` in [0, 1] (``C`` = 1 or 3, ``S`` = ``image_size``, 64 by
default) to a Gaussian posterior over ``(B, latent_dim)`` and back, with the design of
:mod:`hrm_vision.vae` for a whole crop: a **linear path** (a fixed whitened basis of
``latent_dim`` components, :class:`CropBasis`: a low-frequency 2-D DCT, the crop PCA after
``init_from_data``; then a learnable square map, identity at the start) plus **nonlinear
branches** (convolutions down to 4x4 and a fully connected head; fully connected to 4x4 and
PixelShuffle up), each ending in a layer that starts at zero. The classes register in
:data:`hrm_vision.vae.MODELS` when this module is imported (``import hrm_vision`` does).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .patches import allocated_logvar, dct_rows
from .vae import (
    BITS_PER_PIXEL,
    LOGVAR_INIT,
    ResBlock,
    Shuffled,
    VAEBase,
    down,
    register_model,
    up,
    zero_conv,
)

BOTTOM = 4  #: side of the feature map at the bottom of both branches
MAX_FIT_IMAGES = 4096  #: crops fitted by ``init_from_data`` at most (their Gram matrix)


def crop_dct_basis(channels: int, size: int, count: int) -> tuple[Tensor, Tensor]:
    """``(components (count, C*S*S), std (count,))``: the ``count`` lowest-frequency (by
    ``hypot(u, v)``, ``u``, channel) 2-D DCT-II vectors of a ``channels x size x size`` image and
    a 1/f guess of their standard deviations, ``size / 4 / (1 + hypot(u, v))``."""
    if count > channels * size * size:
        raise ValueError(f"{count} components do not fit a {channels}x{size}x{size} image")
    reach = 2 * math.isqrt(count) + 2  # enough frequencies for ``count`` components
    order = sorted(((u, v, c) for u in range(min(size, reach)) for v in range(min(size, reach))
                    for c in range(channels)),
                   key=lambda t: (math.hypot(t[0], t[1]), t[0], t[2]))[:count]
    std = torch.tensor([size / 4 / (1 + math.hypot(u, v)) for u, v, _ in order])
    return dct_rows(order, channels, size), std


@torch.no_grad()
def fit_crop_pca(images: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``count`` principal components of flattened crops ``images`` (N, C, S, S) in
    [0, 1]: ``(mean (D,), components (count, D) orthonormal rows, std (count,))``, ``D =
    C*S*S``, computed in float64 from the ``N x N`` Gram matrix; needs ``count < N``."""
    rows = images.reshape(images.shape[0], -1).double()
    if count >= rows.shape[0]:
        raise ValueError(f"fitting {count} components needs more than {count} images, "
                         f"got {rows.shape[0]}")
    mean = rows.mean(0)
    centred = rows - mean
    eigval, eigvec = torch.linalg.eigh(centred @ centred.T)  # ascending
    eigval, eigvec = eigval.flip(0)[:count].clamp(min=1e-12), eigvec.flip(1)[:, :count]
    components = (eigvec.T @ centred) / eigval.sqrt()[:, None]
    std = (eigval / (rows.shape[0] - 1)).sqrt()
    return mean.float(), components.float(), std.float()


class CropBasis(nn.Module):
    """A fixed whitened basis of whole crops (buffers): :meth:`analyse` ``(B, C, S, S)`` ->
    ``(B, K)``, ``(x - mean) @ components.T / std``; :meth:`synthesise` back (not clamped)."""

    mean: Tensor
    components: Tensor
    std: Tensor

    def __init__(self, channels: int, size: int, count: int) -> None:
        super().__init__()
        self.shape = (channels, size, size)
        components, std = crop_dct_basis(channels, size, count)
        self.register_buffer("mean", torch.full((components.shape[1],), 0.5))
        self.register_buffer("components", components)
        self.register_buffer("std", std)

    @torch.no_grad()
    def set_basis(self, mean: Tensor, components: Tensor, std: Tensor) -> None:
        """Use ``mean (D,)``, ``components (K, D)`` and ``std (K,)`` (see :func:`fit_crop_pca`)."""
        if components.shape != self.components.shape:
            raise ValueError(f"expected components of shape {tuple(self.components.shape)}, "
                             f"got {tuple(components.shape)}")
        self.mean.copy_(mean)
        self.components.copy_(components)
        self.std.copy_(std.clamp(min=1e-6))

    def analyse(self, x: Tensor) -> Tensor:
        return ((x.flatten(1) - self.mean) @ self.components.T) / self.std

    def synthesise(self, coef: Tensor) -> Tensor:
        return (self.mean + (coef * self.std) @ self.components).reshape(-1, *self.shape)


class _CropCoder(nn.Module):
    """The linear path of either direction: a crop basis and a square map, identity at first."""

    def __init__(self, basis: CropBasis, latent_dim: int) -> None:
        super().__init__()
        self.basis = basis
        self.linear = nn.Linear(latent_dim, latent_dim, bias=False)
        nn.init.eye_(self.linear.weight)


class CompactEncoder(_CropCoder):
    """Image ``(B, C, S, S)`` in [0, 1] -> ``(B, 2 * latent_dim)`` (mu, then logvar): ``mu =
    linear(basis(x)) + head(features(x))``, ``features`` halving the side per stage to
    ``BOTTOM``."""

    def __init__(self, basis: CropBasis, widths: list[int], latent_dim: int,
                 blocks: int) -> None:
        super().__init__(basis, latent_dim)
        stages: list[nn.Module] = [down(basis.shape[0], widths[0], kernel=3)]
        for prev, w in zip(widths[:-1], widths[1:], strict=True):
            stages.append(nn.Sequential(nn.ReLU(), down(prev, w),
                                        *(ResBlock(w) for _ in range(blocks))))
        #: One module per resolution (a perceptual backbone taps the first).
        self.features = nn.ModuleList([*stages, nn.Sequential(nn.ReLU(), nn.Flatten())])
        self.head = nn.Linear(widths[-1] * BOTTOM * BOTTOM, 2 * latent_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        nn.init.constant_(self.head.bias[latent_dim:], LOGVAR_INIT)

    def forward(self, x: Tensor) -> Tensor:
        h = (x * 2.0).sub_(1.0)  # in place: one image-sized tensor fewer
        for stage in self.features:
            h = stage(h)
        mu, logvar = self.head(h).chunk(2, dim=1)
        return torch.cat([self.linear(self.basis.analyse(x)) + mu, logvar], dim=1)


class CompactDecoder(_CropCoder):
    """Latent ``(B, latent_dim)`` -> image ``(B, C, S, S)`` (unclamped):
    ``basis.synthesise(linear(z)) + stages(fc(z))``, ``fc`` to ``BOTTOM x BOTTOM`` features, the
    stages doubling the side, the last layer zero at the start."""

    def __init__(self, basis: CropBasis, widths: list[int], latent_dim: int,
                 blocks: int) -> None:
        super().__init__(basis, latent_dim)
        rev = widths[::-1]
        self.fc = nn.Linear(latent_dim, rev[0] * BOTTOM * BOTTOM)
        layers: list[nn.Module] = [nn.Unflatten(1, (rev[0], BOTTOM, BOTTOM))]
        for prev, w in zip(rev[:-1], rev[1:], strict=True):
            layers += [nn.ReLU(), up(prev, w), *(ResBlock(w) for _ in range(blocks))]
        self.stages = Shuffled(*layers, nn.ReLU(), zero_conv(rev[-1], 4 * basis.shape[0]),
                               nn.PixelShuffle(2))

    def forward(self, z: Tensor) -> Tensor:
        return self.basis.synthesise(self.linear(z)) + self.stages(self.fc(z))


class CompactVAE(VAEBase):
    """A VAE of crops ``(B, input_channels, image_size, image_size)`` in [0, 1] (RGB, or grey)
    with latents ``(B, latent_dim)``; ``image_size`` must be ``BOTTOM * 2**len(widths)``."""

    def __init__(self, latent_dim: int, image_size: int, input_channels: int,
                 widths: list[int], blocks: int) -> None:
        super().__init__(latent_dim)
        if input_channels not in (1, 3):
            raise ValueError(f"input_channels must be 1 (grey) or 3 (RGB), got {input_channels}")
        if image_size != BOTTOM * 2 ** len(widths):
            raise ValueError(f"image_size must be {BOTTOM * 2 ** len(widths)} for "
                             f"{len(widths)} stages, got {image_size}")
        if min(widths) < 1 or blocks < 0:
            raise ValueError(f"widths must be positive and blocks >= 0, got {widths}, {blocks}")
        self.in_channels = input_channels
        self.image_size = image_size
        self.downsample_factor = image_size
        self.encoder = CompactEncoder(self._basis(), widths, latent_dim, blocks)
        self.decoder = CompactDecoder(self._basis(), widths, latent_dim, blocks)

    def _basis(self) -> CropBasis:
        """A fresh data-free basis (the encoder alone, which a pipeline runs, holds one too)."""
        return CropBasis(self.in_channels, self.image_size, self.latent_dim)

    def latent_shape(self, height: int | None = None,
                     width: int | None = None) -> tuple[int, ...]:
        """``(latent_dim,)``: one vector per crop, whatever the arguments."""
        return (self.latent_dim,)

    def _check_images(self, x: Tensor) -> None:
        super()._check_images(x)
        s = self.image_size
        if x.shape[2:] != (s, s):
            raise ValueError(f"expected {s}x{s} crops, got {x.shape[2]}x{x.shape[3]}; "
                             f"resize the input to {s}x{s}")

    @torch.no_grad()
    def init_from_data(self, images: Tensor, teacher: VAEBase | None = None,
                       bits_per_pixel: float = BITS_PER_PIXEL) -> None:
        """Fit the basis to the PCA of the first :data:`MAX_FIT_IMAGES` of ``images`` (N, C, S,
        S) in [0, 1] (more than ``latent_dim``) and re-allocate the rate of ``LOGVAR_INIT``;
        ``bits_per_pixel`` is ignored: the means stay whole, so the start decodes as crop PCA.

        With a compact ``teacher`` of the same crops and at least ``latent_dim`` numbers, the
        basis is the first ``latent_dim`` components of the teacher's: a distilled student starts
        in its teacher's coordinates, whatever images it sees (``docs/irp.md``)."""
        self._check_images(images)
        crops = images[:MAX_FIT_IMAGES].float().cpu()
        k = self.latent_dim
        if (isinstance(teacher, CompactVAE) and teacher.latent_dim >= k
                and (teacher.in_channels, teacher.image_size)
                == (self.in_channels, self.image_size)):
            b = teacher.encoder.basis
            fitted = (b.mean.cpu(), b.components[:k].cpu(), b.std[:k].cpu())
        else:
            fitted = fit_crop_pca(crops, k)
        for basis in (self.encoder.basis, self.decoder.basis):
            basis.set_basis(*fitted)
        enc_w, enc_b, dec_w, _ = self.linear_path()
        logvar = allocated_logvar(enc_w, enc_b, dec_w, crops.flatten(1), LOGVAR_INIT)
        self.encoder.head.bias[self.latent_dim:] = logvar.to(self.encoder.head.bias)

    @torch.no_grad()
    def linear_path(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The linear paths as affine maps between a flattened crop (``D = C*S*S``, NCHW) and
        the latent: ``(enc_weight (L, D), enc_bias (L,), dec_weight (D, L), dec_bias (D,))``."""
        e, d = self.encoder.basis, self.decoder.basis
        enc_w = self.encoder.linear.weight @ (e.components / e.std[:, None])
        dec_w = (d.components.T * d.std[None, :]) @ self.decoder.linear.weight
        return enc_w, -(enc_w @ e.mean), dec_w, d.mean.clone()


@register_model("compact_student")
class CompactStudentVAE(CompactVAE):
    """The compact student: ``latent_dim`` numbers (64; 16 also works) per ``image_size`` crop,
    stage widths ``base_channels * (1, 2, 4, 8)``, no residual blocks in the encoder (under a
    millisecond per crop on one CPU thread), one per stage in the decoder."""

    def __init__(self, latent_dim: int = 64, image_size: int = 64, input_channels: int = 3,
                 base_channels: int = 16) -> None:
        widths = [base_channels * 2 ** i for i in range(4)]
        super().__init__(latent_dim, image_size, input_channels, widths, 0)
        # The decoder's cost does not count towards encode latency: give it residual blocks.
        self.decoder = CompactDecoder(self._basis(), widths, latent_dim, 1)
        self._arch = {"latent_dim": latent_dim, "image_size": image_size,
                      "input_channels": input_channels, "base_channels": base_channels}


@register_model("compact_teacher")
class CompactTeacherVAE(CompactVAE):
    """The compact teacher: ``latent_dim`` (512) numbers per crop, stage widths ``base_channels
    * (1, 2, 4, 8)`` with ``blocks_per_stage`` residual blocks each (about 10x the student)."""

    def __init__(self, latent_dim: int = 512, image_size: int = 64, input_channels: int = 3,
                 base_channels: int = 24, blocks_per_stage: int = 1) -> None:
        widths = [base_channels * 2 ** i for i in range(4)]
        super().__init__(latent_dim, image_size, input_channels, widths, blocks_per_stage)
        self._arch = {"latent_dim": latent_dim, "image_size": image_size,
                      "input_channels": input_channels, "base_channels": base_channels,
                      "blocks_per_stage": blocks_per_stage}
