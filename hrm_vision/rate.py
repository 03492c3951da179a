"""Rate arithmetic: nats per latent element, bits per pixel, and what a rate buys a Gaussian code.

A VAE's rate is its KL to the prior, in nats. For a latent ``(C, H/8, W/8)`` of an image
``(3, H, W)`` there are ``C`` latent elements per 8x8 patch (64 pixels, 192 numbers), so
``r`` nats per latent element are ``r * C / 64`` nats per pixel and ``r * C / (64 ln 2)`` bits
per pixel (:func:`bits_per_pixel`).

Reference distortions at a rate come from the covariance spectrum of the vectors being coded
(the eigenvalues of 8x8x3 patches, :func:`hrm_vision.vae.patches.fit_patch_pca`, or of whole
crops), pixels in [0, 1]:

* :func:`water_filling` is the Gaussian rate-distortion function (reverse water-filling, Cover &
  Thomas, *Elements of Information Theory*, 13.3.3): the least mean squared error any code with
  that rate reaches on a Gaussian source with that spectrum, and the best linear-Gaussian code
  on any source with that covariance. For a VAE it is reached by decoding a posterior sample
  ``z`` with the conditional-mean decoder, with the rate equal to the KL.
* :func:`uniform_allocation` gives every one of the first ``k`` components the same rate and
  drops the others: what a KL floor per latent channel (free bits per channel) asks of a linear
  code whose ``k`` channels carry the ``k`` largest components.

Distortions are mean squared errors per number of the vector (per pixel and colour channel);
:func:`psnr_db` turns them into PSNR for images in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: Pixels per latent grid cell (an 8x8 patch).
PIXELS_PER_CELL = 64


def _spectrum(eigenvalues: Tensor | Sequence[float]) -> Tensor:
    """Eigenvalues as a float64 vector sorted in decreasing order, negatives (round-off) at 0."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
    if lam.numel() == 0 or not torch.isfinite(lam).all():
        raise ValueError("expected a non-empty spectrum of finite eigenvalues")
    return lam.clamp(min=0).sort(descending=True).values


def _check_rate(rate_nats: float) -> None:
    if not rate_nats >= 0 or math.isinf(rate_nats):
        raise ValueError(f"a rate must be finite and >= 0 nats, got {rate_nats}")


def water_level(eigenvalues: Tensor | Sequence[float], rate_nats: float) -> float:
    """The water level ``theta`` of reverse water-filling at a total rate of ``rate_nats``.

    Components with variance above ``theta`` are coded with error ``theta`` each and cost
    ``0.5 ln(lambda / theta)`` nats; the others are dropped. With the ``m`` largest components
    active, ``ln theta = (sum_{i<=m} ln lambda_i - 2 R) / m``; the answer is the ``m`` for which
    ``lambda_m > theta >= lambda_{m+1}``. At rate 0 it is the largest eigenvalue.
    """
    lam = _spectrum(eigenvalues)
    _check_rate(rate_nats)
    positive = lam[lam > 0]
    if positive.numel() == 0 or rate_nats == 0:
        return float(lam[0])
    logs = torch.cumsum(positive.log(), 0)
    for m in range(1, positive.numel() + 1):
        theta = math.exp((float(logs[m - 1]) - 2 * rate_nats) / m)
        below = float(positive[m]) if m < positive.numel() else 0.0
        if theta >= below:
            return theta
    raise AssertionError("unreachable: the last active set always satisfies the condition")


def water_filling(eigenvalues: Tensor | Sequence[float], rate_nats: float) -> float:
    """Least mean squared error per number at a total rate of ``rate_nats`` nats per vector.

    ``eigenvalues``: the covariance spectrum of the vectors (D numbers each). Returns
    ``sum_i min(lambda_i, theta) / D`` with ``theta`` the :func:`water_level`.
    """
    lam = _spectrum(eigenvalues)
    theta = water_level(lam, rate_nats)
    return float(lam.clamp(max=theta).sum()) / lam.numel()


def uniform_allocation(eigenvalues: Tensor | Sequence[float], rate_nats_each: float,
                       components: int) -> float:
    """Mean squared error per number when each of the ``components`` largest components gets
    ``rate_nats_each`` nats (error ``lambda e^{-2r}``) and the rest are dropped (error ``lambda``).
    """
    lam = _spectrum(eigenvalues)
    _check_rate(rate_nats_each)
    if not 0 <= components <= lam.numel():
        raise ValueError(f"components must be in [0, {lam.numel()}], got {components}")
    kept = lam[:components].sum() * math.exp(-2 * rate_nats_each)
    return float(kept + lam[components:].sum()) / lam.numel()


def psnr_db(mean_squared_error: float) -> float:
    """PSNR in dB of images in [0, 1] with this mean squared error (``inf`` at 0)."""
    if not mean_squared_error >= 0:
        raise ValueError(f"an MSE must be >= 0, got {mean_squared_error}")
    return math.inf if mean_squared_error == 0 else -10 * math.log10(mean_squared_error)


def bits_per_pixel(nats_per_element: float, latent_channels: int) -> float:
    """Bits per pixel of a latent with ``latent_channels`` elements per 8x8 patch spending
    ``nats_per_element`` nats each (5.77 bits per pixel for 2 nats at 128 channels)."""
    return nats_per_element * latent_channels / (PIXELS_PER_CELL * math.log(2))


def patch_rate_nats(nats_per_element: float, latent_channels: int) -> float:
    """Nats per 8x8 patch (per latent grid cell) of ``latent_channels`` elements."""
    return nats_per_element * latent_channels
