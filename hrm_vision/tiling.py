"""Tiled encode and decode: frames larger than a memory budget, with the full-frame result.

:func:`receptive_field` measures on the model how far around its own cell a latent cell (a
decoded pixel) looks. The tiled functions cut the frame (or latent) into tiles on the latent
grid, extend each by that margin in whole cells (clipped at the border, where the full frame has
the same zero padding), run the model and keep the core: the full-frame result up to float
rounding, holding one extended tile at a time. Images ``(N, 3, H, W)`` in [0, 1], H and W
divisible by 8; latents ``(N, C, H/8, W/8)``.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .vae import DOWNSAMPLE_FACTOR, VAEBase

CELL = DOWNSAMPLE_FACTOR  #: side of a latent cell in pixels


class ReceptiveField(NamedTuple):
    """Margins in pixels on each side of a latent cell's 8x8 patch: the input its latent
    depends on (``encode_px``), the output that depends on it (``decode_px``); ``*_cells``: the
    same in whole cells, the tile overlap."""

    encode_px: int
    decode_px: int

    @property
    def encode_cells(self) -> int:
        return math.ceil(self.encode_px / CELL)

    @property
    def decode_cells(self) -> int:
        return math.ceil(self.decode_px / CELL)


def _probe(module: nn.Module) -> nn.Module:
    """A float64 copy with positive parameters (weights ``1/fan_in``, biases 0.1): every ReLU
    passes a positive input, so an output's gradient is non-zero exactly on its receptive field."""
    probe = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        for name, p in probe.named_parameters():
            p.fill_(0.1 if name.endswith("bias") else 1.0 / max(1, p[0].numel()))
    return probe


def _margin(grad: Tensor, lo: int, hi: int) -> int | None:
    """Pixels of the support of ``grad`` (H, W) outside the square ``[lo, hi)``; None if the
    support reaches the border (the probe was too small)."""
    rows = grad.abs().sum(1).nonzero().flatten()
    cols = grad.abs().sum(0).nonzero().flatten()
    first, last = int(min(rows[0], cols[0])), int(max(rows[-1], cols[-1]))
    if first == 0 or last == grad.shape[-1] - 1:
        return None
    return max(lo - first, last + 1 - hi, 0)


@torch.enable_grad()  # also when called under no_grad, as the tiled functions are
def receptive_field(vae: VAEBase, max_cells: int = 64) -> ReceptiveField:
    """The encoder's and the decoder's margins on ``vae``: the support of the gradient of the
    centre cell's output on a positive-weight float64 copy (:func:`_probe`), ``2k + 1`` cells a
    side, ``k`` doubling from 4 up to ``max_cells`` until the support fits inside."""
    encoder, decoder = _probe(vae.encoder), _probe(vae.decoder)
    margins: list[int] = []
    for net, channels, scale in ((encoder, vae.in_channels, CELL), (decoder, vae.latent_dim, 1)):
        k = 4
        while True:
            side = (2 * k + 1) * scale
            x = torch.ones(1, channels, side, side, dtype=torch.float64, requires_grad=True)
            out = net(x)
            centre = slice(k, k + 1) if net is encoder else slice(k * CELL, (k + 1) * CELL)
            out[..., centre, centre].sum().backward()
            lo, hi = k * scale, (k + 1) * scale
            margin = _margin(x.grad[0].sum(0), lo, hi)  # type: ignore[index]
            if margin is not None:
                margins.append(margin if net is encoder else margin * CELL)
                break
            if k >= max_cells:
                raise ValueError(f"receptive field wider than {max_cells} latent cells")
            k *= 2
    return ReceptiveField(margins[0], margins[1])


def _spans(cells: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """``(core start, core end, extended start, extended end)`` in cells along one side."""
    return [(start, min(start + tile, cells), max(start - halo, 0), min(start + tile + halo, cells))
            for start in range(0, cells, tile)]


def _tiled(fn, x: Tensor, out_channels: int, scale_in: int, scale_out: int,  # noqa: ANN001
           tile: int, halo_cells: int) -> Tensor:
    """Run ``fn`` on halo-extended tiles of ``x`` and assemble the cores (``tile`` in pixels of
    the image side, a multiple of 8, the halo in cells)."""
    if tile < CELL or tile % CELL:
        raise ValueError(f"tile side must be a positive multiple of {CELL} pixels, got {tile}")
    tile_cells = tile // CELL
    rows, cols = x.shape[2] // scale_in, x.shape[3] // scale_in
    out = x.new_empty(x.shape[0], out_channels, rows * scale_out, cols * scale_out)
    for r0, r1, a0, a1 in _spans(rows, tile_cells, halo_cells):
        for c0, c1, b0, b1 in _spans(cols, tile_cells, halo_cells):
            y = fn(x[:, :, a0 * scale_in:a1 * scale_in, b0 * scale_in:b1 * scale_in])
            out[:, :, r0 * scale_out:r1 * scale_out, c0 * scale_out:c1 * scale_out] = y[
                :, :, (r0 - a0) * scale_out:(r1 - a0) * scale_out,
                (c0 - b0) * scale_out:(c1 - b0) * scale_out]
    return out


@torch.no_grad()
def encode_tiled(vae: VAEBase, x: Tensor, tile: int = 256,
                 field: ReceptiveField | None = None) -> Tensor:
    """``vae.encode(x)`` on tiles with cores of ``tile`` pixels a side (a multiple of 8): ``x``
    (N, 3, H, W) in [0, 1] -> (N, C, H/8, W/8); ``field`` defaults to :func:`receptive_field`."""
    vae._check_images(x)
    field = field or receptive_field(vae)
    return _tiled(vae.encode, x, vae.latent_dim, CELL, 1, tile, field.encode_cells)


@torch.no_grad()
def decode_tiled(vae: VAEBase, z: Tensor, tile: int = 256,
                 field: ReceptiveField | None = None) -> Tensor:
    """``vae.decode(z)`` on tiles with cores of ``tile`` output pixels a side (a multiple of 8):
    ``z`` (N, C, h, w) -> (N, 3, 8h, 8w) in [0, 1]."""
    vae._check_latent(z)
    field = field or receptive_field(vae)
    return _tiled(vae.decode, z, vae.in_channels, 1, CELL, tile, field.decode_cells)
