"""Latents as bytes: 8 bits per number with a stored per-channel range.

A latent ``z`` of shape ``(N, C, ...)`` (float, any range) is stored as ``uint8`` codes of the
same shape plus two float32 vectors ``low`` and ``step`` of length ``C``: code ``q`` stands for
``low + step * q``. The range comes either from the latents themselves (:func:`fit_range`, e.g.
one frame's) or from training latents, so that 64 numbers per crop are 64 bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

LEVELS = 255  #: the largest code


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def fit_range(latents: Tensor) -> tuple[Tensor, Tensor]:
    """``(low, step)``, float32 ``(C,)``, covering the per-channel range of ``latents``
    ``(N, C, ...)`` in :data:`LEVELS` equal steps (a constant channel gets step 1)."""
    if latents.ndim < 2 or latents.shape[0] == 0:
        raise ValueError(f"latents must be (N, C, ...) with N >= 1, got {tuple(latents.shape)}")
    flat = latents.detach().float().transpose(0, 1).reshape(latents.shape[1], -1)
    if not torch.isfinite(flat).all():
        raise ValueError("latents hold NaN or infinite values")
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    step = (high - low) / LEVELS
    return low, torch.where(step > 0, step, torch.ones_like(step))


def to_8bit(latents: Tensor, low: Tensor, step: Tensor) -> Tensor:
    """``uint8`` codes of ``latents`` ``(N, C, ...)`` on the range ``(low, step)`` (``(C,)``
    each); values outside the range are clipped to it."""
    if low.shape != (latents.shape[1],) or step.shape != low.shape:
        raise ValueError(f"low/step must be ({latents.shape[1]},), got {tuple(low.shape)}, "
                         f"{tuple(step.shape)}")
    low, step = _per_channel(low, latents.ndim), _per_channel(step, latents.ndim)
    q = torch.round((latents.float() - low.to(latents.device)) / step.to(latents.device))
    return q.clamp_(0, LEVELS).to(torch.uint8)


def from_8bit(codes: Tensor, low: Tensor, step: Tensor) -> Tensor:
    """Float32 latents ``(N, C, ...)`` of ``uint8`` ``codes`` on the range ``(low, step)``."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    low, step = _per_channel(low, codes.ndim), _per_channel(step, codes.ndim)
    return low.to(codes.device) + step.to(codes.device) * codes.float()
