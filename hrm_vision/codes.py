"""Latents as bytes: 8 bits per number with stored per-channel statistics.

A latent ``z`` of shape ``(N, C, ...)`` (float, any range) is stored as ``uint8`` codes of the
same shape plus two float32 vectors of length ``C``:

- on the latents' own range (:func:`fit_range`, e.g. one frame's: ``perceive``): ``low`` and
  ``step``, code ``q`` stands for ``low + step * q``;
- on the training latents' distribution (:func:`fit_spread`: the plugin's and the trust report's
  64 bytes per crop): ``centre`` and ``spread``, 256 equal-probability bins of a Gaussian of
  standard deviation ``spread`` (:data:`SPREAD` training standard deviations), so a heavy tail
  costs only its own bins. On the shipped compact student's held-out crops a min/max training
  range lost 0.239 dB, these bins 0.020 dB (``python experiments/latent_8bit.py``).

Tokens: one id (9 bits) per residual k-means codebook of :data:`ENTRIES` entries over the
latent. :class:`Codes` holds the range and codebooks (a ``.safetensors`` file).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

LEVELS = 255  #: the largest code


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def _channel_rows(latents: Tensor) -> Tensor:
    """``latents`` ``(N >= 1, C, ...)`` as float32 rows ``(C, N * ...)``, checked finite."""
    if latents.ndim < 2 or latents.shape[0] == 0:
        raise ValueError(f"latents must be (N, C, ...) with N >= 1, got {tuple(latents.shape)}")
    flat = latents.detach().float().transpose(0, 1).reshape(latents.shape[1], -1)
    if not torch.isfinite(flat).all():
        raise ValueError("latents hold NaN or infinite values")
    return flat


def fit_range(latents: Tensor) -> tuple[Tensor, Tensor]:
    """``(low, step)``, float32 ``(C,)``, covering the per-channel range of ``latents``
    ``(N, C, ...)`` in :data:`LEVELS` equal steps (a constant channel gets step 1)."""
    flat = _channel_rows(latents)
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


SPREAD = 5.0  #: the bins' Gaussian, in training standard deviations (experiments/latent_8bit.py)


def fit_spread(latents: Tensor, spread: float = SPREAD) -> tuple[Tensor, Tensor]:
    """``(centre, spread)``, float32 ``(C,)``: the per-channel mean of training ``latents``
    ``(N >= 2, C, ...)`` and ``spread`` times their standard deviation (at least 1e-6)."""
    flat = _channel_rows(latents)
    if flat.shape[1] < 2:
        raise ValueError("fitting the bins needs at least two latents")
    return flat.mean(dim=1), (spread * flat.std(dim=1)).clamp(min=1e-6)


def to_8bit_binned(latents: Tensor, centre: Tensor, spread: Tensor) -> Tensor:
    """``uint8`` codes of ``latents`` ``(N, C, ...)``: the equal-probability bin of the Gaussian
    ``(centre, spread)`` (``(C,)`` each) each number falls in."""
    if centre.shape != (latents.shape[1],) or spread.shape != centre.shape:
        raise ValueError(f"centre/spread must be ({latents.shape[1]},), got "
                         f"{tuple(centre.shape)}, {tuple(spread.shape)}")
    centre, spread = (_per_channel(v, latents.ndim).to(latents.device) for v in (centre, spread))
    u = torch.special.ndtr((latents.float() - centre) / spread)
    return (u * (LEVELS + 1)).floor_().clamp_(0, LEVELS).to(torch.uint8)


def from_8bit_binned(codes: Tensor, centre: Tensor, spread: Tensor) -> Tensor:
    """Float32 latents ``(N, C, ...)`` of :func:`to_8bit_binned` codes: each bin's median."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    u = torch.special.ndtri((codes.float() + 0.5) / (LEVELS + 1))
    return _per_channel(centre, codes.ndim).to(codes.device) + \
        _per_channel(spread, codes.ndim).to(codes.device) * u


# ---------------------------------------------------------------------- tokens
ENTRIES = 512  #: entries of each token codebook (9 bits per id)


@torch.no_grad()
def fit_codebooks(latents: Tensor, stages: int = 4, entries: int = ENTRIES,
                  iterations: int = 20, seed: int = 0) -> Tensor:
    """Residual k-means codebooks ``(stages, entries, D)`` of latents ``(N, ...)`` (flattened to
    ``D`` numbers, ``N >= entries``): stage ``s`` clusters what stages ``< s`` leave, so the first
    ``k`` ids of :func:`to_tokens` decode to a coarse-to-fine sum of ``k`` entries."""
    rows = latents.detach().float().flatten(1).cpu()
    if rows.shape[0] < entries or min(stages, iterations) < 1 or not rows.isfinite().all():
        raise ValueError(f"fitting {stages} codebooks of {entries} entries needs at least "
                         f"{entries} finite latents (got {rows.shape[0]}), stages and iterations "
                         ">= 1")
    generator = torch.Generator().manual_seed(seed)
    books = []
    for _ in range(stages):
        book = rows[torch.randperm(len(rows), generator=generator)[:entries]].clone()
        for _ in range(iterations):  # Lloyd; an entry left empty keeps its place
            nearest = torch.cdist(rows, book).argmin(1)
            sums = torch.zeros_like(book).index_add_(0, nearest, rows)
            counts = torch.bincount(nearest, minlength=entries).unsqueeze(1)
            book = torch.where(counts > 0, sums / counts.clamp(min=1), book)
        rows = rows - book[torch.cdist(rows, book).argmin(1)]
        books.append(book)
    return torch.stack(books)


def to_tokens(latents: Tensor, codebooks: Tensor) -> Tensor:
    """``int64`` ids ``(N, stages)`` in ``[0, entries)`` of latents ``(N, ...)``, chosen greedily
    stage by stage (so the first ``k`` columns are the ``k``-id code)."""
    rest, books = latents.detach().float().flatten(1), codebooks.to(latents.device)
    if rest.shape[1] != books.shape[2]:
        raise ValueError(f"the codebooks hold {books.shape[2]} numbers per latent, the latents "
                         f"{rest.shape[1]}")
    ids = []
    for book in books:
        ids.append(torch.cdist(rest, book).argmin(1))
        rest = rest - book[ids[-1]]
    return torch.stack(ids, dim=1)


def from_tokens(tokens: Tensor, codebooks: Tensor) -> Tensor:
    """Float32 latents ``(N, D)``: the sum of the entries that ids ``(N, k)`` (``k`` at most the
    codebooks, the first ``k`` stages) name."""
    if tokens.dtype.is_floating_point or tokens.ndim != 2 or tokens.shape[1] > len(codebooks):
        raise ValueError(f"tokens must be integer ids (N, k <= {len(codebooks)}), got "
                         f"{tokens.dtype} {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= codebooks.shape[1]):
        raise ValueError(f"token ids must be in [0, {codebooks.shape[1]})")
    books = codebooks.to(tokens.device)
    return books[torch.arange(tokens.shape[1], device=tokens.device), tokens.long()].sum(1)


class Codes(NamedTuple):
    """What turns a model's latents into codes and back: the 8-bit bins' ``centre`` and
    ``spread`` ``(C,)`` (:func:`fit_spread`) and the token ``codebooks`` ``(stages, entries,
    D)``, fitted on training latents."""

    centre: Tensor
    spread: Tensor
    codebooks: Tensor

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({k: v.detach().cpu().contiguous().float() for k, v in self._asdict().items()})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Codes:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            return cls(**{k: tensors[k] for k in cls._fields})
        except Exception as exc:  # safetensors raises several types for a bad file
            raise ValueError(f"{path} is not a codes file of `hrm-vision trust` "
                             f"(centre, spread, codebooks): {exc}") from exc
