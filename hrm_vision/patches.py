"""The linear patch path of the VAEs and the arithmetic of rates.

**Patches.** :class:`PatchWhitening` maps each 8x8 patch (``PixelUnshuffle(8)``: ``(B, 192,
H/8, W/8)``) to whitened coefficients of a fixed basis (the DCT-II, or the patch PCA after
``init_from_data``) and back. Unit-variance coefficients let the learnable 1x1 convolution on
top start at the identity, so an Adam step is a small relative change for every coefficient.

**Rates** are KLs to the prior, in nats: :func:`allocate_rate` spends a KL budget where a
linear decoder needs it; ``r`` nats per element of a ``(C, H/8, W/8)`` latent are ``r * C /
(64 ln 2)`` bits per pixel (:func:`bits_per_pixel`). Reference MSEs per number at a rate, from
the covariance spectrum of the coded vectors: :func:`water_filling` (the Gaussian
rate-distortion function, Cover & Thomas 13.3.3) and :func:`uniform_allocation` (the same rate
on each of the first ``k`` components, the others dropped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PATCH = 8  #: side of the patches: the latent grid is H/8 x W/8


def patch_vectors(images: Tensor, patch: int = PATCH) -> Tensor:
    """All non-overlapping patches of ``images`` (N, C, H, W) as rows (N * H/p * W/p, C*p*p),
    columns in PixelUnshuffle's order."""
    cols = F.pixel_unshuffle(images, patch)  # (N, C*p*p, H/p, W/p)
    return cols.permute(0, 2, 3, 1).reshape(-1, cols.shape[1])


def dct_rows(freqs: Sequence[tuple[int, int, int]], channels: int, size: int) -> Tensor:
    """Orthonormal 2-D DCT-II vectors ``(len(freqs), channels * size**2)`` of a ``channels x size
    x size`` image, one per ``(u, v, channel)`` of ``freqs``, flattened in NCHW order."""
    n = torch.arange(size, dtype=torch.float64)
    c1 = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size))  # (k, n)
    c1[0] *= 1 / math.sqrt(2)
    c1 *= math.sqrt(2 / size)
    rows = torch.zeros(len(freqs), channels, size, size, dtype=torch.float64)
    for i, (u, v, c) in enumerate(freqs):
        rows[i, c] = torch.outer(c1[u], c1[v])
    return rows.reshape(len(freqs), -1).float()


def dct_basis(patch: int = PATCH, channels: int = 3) -> Tensor:
    """The full DCT-II basis ``(D, D)`` of ``channels x patch x patch`` patches, rows by ``u +
    v``, then ``u``, then the colour (the first rows: the patch means of each colour)."""
    order = sorted(((u, v, c) for u in range(patch) for v in range(patch)
                    for c in range(channels)), key=lambda t: (t[0] + t[1], t[0], t[2]))
    return dct_rows(order, channels, patch)


@torch.no_grad()
def fit_patch_pca(images: Tensor, patch: int = PATCH) -> tuple[Tensor, Tensor, Tensor]:
    """PCA of the patches of ``images`` (N, C, H, W) in [0, 1], in float64: ``(mean (D,),
    components (D, D) one per row, variances (D,) decreasing)``, ``D = C * patch**2``."""
    if images.dim() != 4 or images.shape[-1] % patch or images.shape[-2] % patch:
        raise ValueError(f"expected images (N, C, H, W) with H, W divisible by {patch}, got "
                         f"{tuple(images.shape)}")
    rows = patch_vectors(images.double(), patch)
    if rows.shape[0] < 2:
        raise ValueError("fit_patch_pca needs at least two patches")
    mean = rows.mean(0)
    centred = rows - mean
    cov = centred.T @ centred / (rows.shape[0] - 1)
    variances, vectors = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(variances, descending=True)
    return mean.float(), vectors[:, order].T.contiguous().float(), variances[order].clamp(
        min=0).float()


def posterior_kl(second_moment: Tensor, variance: Tensor) -> Tensor:
    """Mean KL in nats of ``N(mu, variance)`` to ``N(0, 1)`` over data with ``E[mu^2] =
    second_moment``: ``0.5 (m + s2 - 1 - ln s2)``, element-wise."""
    return 0.5 * (second_moment + variance - 1.0 - variance.log())


def allocate_rate(gains: Tensor, second_moments: Tensor, total_nats: float) -> Tensor:
    """Posterior variances ``(L,)`` in (0, 1] of a linear code that spend ``total_nats`` of KL
    where they buy most: with second moments ``m_c = E[mu_c^2]`` and decoder gains ``g_c``,
    minimising the added error ``sum_c g_c s_c^2`` at that KL gives ``s_c^2 = lam / (lam + 2
    g_c)``, ``lam`` found by bisection. A budget below ``sum_c m_c / 2`` is a ``ValueError``."""
    g = gains.double().clamp(min=0)
    m = second_moments.double()
    floor = float(posterior_kl(m, torch.ones_like(m)).sum())
    if not total_nats > floor:
        raise ValueError(f"a rate of {total_nats:.4g} nats is below what the means alone spend "
                         f"({floor:.4g} nats)")

    def rate(log_lam: float) -> float:
        lam = math.exp(log_lam)
        return float(posterior_kl(m, lam / (lam + 2 * g)).sum())

    lo, hi = -60.0, 60.0  # the rate falls as lam grows
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rate(mid) > total_nats else (lo, mid)
    lam = math.exp(0.5 * (lo + hi))
    return (lam / (lam + 2 * g)).clamp(min=1e-12).float()


def allocated_logvar(enc_weight: Tensor, enc_bias: Tensor, dec_weight: Tensor, vectors: Tensor,
                     uniform_logvar: float) -> Tensor:
    """Log-variances ``(L,)`` of a linear code (``z = enc_weight @ v + enc_bias``, ``v =
    dec_weight @ z + ...``) on ``vectors`` (N, D): the KL of ``uniform_logvar``, re-allocated."""
    mu = vectors.double() @ enc_weight.double().T + enc_bias.double()
    moments = mu.pow(2).mean(0)
    uniform = torch.full_like(moments, math.exp(uniform_logvar))
    total = float(posterior_kl(moments, uniform).sum())
    return allocate_rate(dec_weight.double().pow(2).sum(0), moments, total).log()


class PatchWhitening(nn.Module):
    """Images ``(B, C, H, W)`` -> whitened patch coefficients ``(B, D, H/8, W/8)``, or back with
    ``inverse=True`` (not clamped): one fixed 1x1 convolution whose ``weight`` and ``bias`` are
    buffers, replaced by :meth:`set_basis`."""

    weight: Tensor
    bias: Tensor

    def __init__(self, inverse: bool = False, channels: int = 3, patch: int = PATCH) -> None:
        super().__init__()
        self.inverse, self.patch = inverse, patch
        dim = channels * patch * patch
        self.register_buffer("weight", torch.zeros(dim, dim, 1, 1))
        self.register_buffer("bias", torch.zeros(dim))
        # A data-free start: the DCT basis, pixel mean 0.5, and every coefficient scaled by the
        # rough standard deviation of a DCT coefficient of natural 8x8 patches in [0, 1].
        self.set_basis(torch.full((dim,), 0.5), dct_basis(patch, channels),
                       torch.full((dim,), 0.25 ** 2), eps=0.0)

    @property
    def dim(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def set_basis(self, mean: Tensor, components: Tensor, variances: Tensor,
                  eps: float = 1e-6) -> None:
        """Use a basis (``components`` (D, D), one per row, as :func:`fit_patch_pca` returns);
        coefficients get unit variance, ``eps`` keeping near-empty components bounded."""
        if components.shape != (self.dim, self.dim):
            raise ValueError(f"expected components of shape {(self.dim, self.dim)}, got "
                             f"{tuple(components.shape)}")
        scale = (variances.double() + eps).sqrt()
        comps, mean = components.double(), mean.double()
        if self.inverse:
            weight, bias = comps.T * scale[None, :], mean
        else:
            weight = comps / scale[:, None]
            bias = -(weight @ mean)
        self.weight.copy_(weight[:, :, None, None])
        self.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.inverse:
            return F.pixel_shuffle(F.conv2d(x, self.weight, self.bias), self.patch)
        return F.conv2d(F.pixel_unshuffle(x, self.patch), self.weight, self.bias)


PIXELS_PER_CELL = PATCH * PATCH  #: pixels per latent grid cell


def _spectrum(eigenvalues: Tensor | Sequence[float], rate_nats: float = 0.0) -> Tensor:
    """Eigenvalues as a float64 vector sorted in decreasing order, negatives (round-off) at 0;
    a ``ValueError`` for an empty or non-finite spectrum or a negative or infinite rate."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
    if lam.numel() == 0 or not torch.isfinite(lam).all():
        raise ValueError("expected a non-empty spectrum of finite eigenvalues")
    if not rate_nats >= 0 or math.isinf(rate_nats):
        raise ValueError(f"a rate must be finite and >= 0 nats, got {rate_nats}")
    return lam.clamp(min=0).sort(descending=True).values


def water_level(eigenvalues: Tensor | Sequence[float], rate_nats: float) -> float:
    """The water level ``theta`` of reverse water-filling at a total rate of ``rate_nats``: with
    the ``m`` largest components active, ``ln theta = (sum_{i<=m} ln lambda_i - 2 R) / m`` for
    the ``m`` where ``lambda_m > theta >= lambda_{m+1}``; the largest eigenvalue at rate 0."""
    lam = _spectrum(eigenvalues, rate_nats)
    positive = lam[lam > 0]
    if positive.numel() == 0 or rate_nats == 0:
        return float(lam[0])
    logs = torch.cumsum(positive.log(), 0)
    for m in range(1, positive.numel()):
        theta = math.exp((float(logs[m - 1]) - 2 * rate_nats) / m)
        if theta >= float(positive[m]):
            return theta
    return math.exp((float(logs[-1]) - 2 * rate_nats) / positive.numel())  # all active


def water_filling_variances(gains: Tensor, rate_nats: float) -> Tensor:
    """Posterior variances ``(L,)`` in (0, 1] of the reverse water-filling code of unit-variance
    coefficients whose decoder gains ``gains`` ``(L,)`` are their variances ``lambda``, at a
    total of ``rate_nats``: ``s^2 = min(1, theta / lambda)``, 1 where the gain is 0."""
    g = gains.double()
    return (water_level(g, rate_nats) / g).clamp(min=1e-12, max=1.0).float()  # g = 0: 1


def water_filling(eigenvalues: Tensor | Sequence[float], rate_nats: float) -> float:
    """Least MSE per number at ``rate_nats`` nats per vector of covariance spectrum
    ``eigenvalues``: ``sum_i min(lambda_i, theta) / D``, ``theta`` the :func:`water_level`."""
    lam = _spectrum(eigenvalues)
    theta = water_level(lam, rate_nats)
    return float(lam.clamp(max=theta).sum()) / lam.numel()


def uniform_allocation(eigenvalues: Tensor | Sequence[float], rate_nats_each: float,
                       components: int) -> float:
    """MSE per number when each of the ``components`` largest components gets ``rate_nats_each``
    nats (error ``lambda e^{-2r}``) and the rest are dropped (error ``lambda``)."""
    lam = _spectrum(eigenvalues, rate_nats_each)
    if not 0 <= components <= lam.numel():
        raise ValueError(f"components must be in [0, {lam.numel()}], got {components}")
    kept = lam[:components].sum() * math.exp(-2 * rate_nats_each)
    return float(kept + lam[components:].sum()) / lam.numel()


def bits_per_pixel(nats_per_element: float, latent_channels: int) -> float:
    """Bits per pixel of a latent with ``latent_channels`` elements per 8x8 patch spending
    ``nats_per_element`` nats each (5.77 bits per pixel for 2 nats at 128 channels)."""
    return nats_per_element * latent_channels / (PIXELS_PER_CELL * math.log(2))

