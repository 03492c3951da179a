"""Reconstructions a learned model must beat: bicubic thumbnails and patch PCA.

Each baseline is a deterministic function of the images (and, for PCA, of training images), so
it is computed on exactly the validation images the models are evaluated on. Images are float
tensors ``(N, 3, H, W)`` in [0, 1] with H and W divisible by 8; PSNR is over the whole set
(pooled MSE), like the models'.

``numbers`` is how many numbers a baseline keeps per image: a thumbnail of side s keeps
``3 * s * s``; patch PCA with k coefficients per 8x8 patch keeps ``k * H/8 * W/8``, the same
count as a latent of k channels on the H/8 x W/8 grid.

The same PCA gives the spectrum of the images' 8x8x3 patches (:func:`patch_spectrum`), from
which :mod:`hrm_vision.patches` computes the best linear-Gaussian reconstruction at a given rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..metrics import psnr as pooled_psnr
from ..metrics import psnr_from_mse as pooled_psnr_from_mse
from ..patches import PATCH, fit_patch_pca, patch_vectors

#: Thumbnail sides and PCA coefficient counts reported by default (for 32x32 images: the 8x8
#: and 16x16 thumbnails; PCA at 16 and 48 coefficients, and at the two latent sizes).
THUMBNAIL_SIDES: tuple[int, ...] = (8, 16)
PCA_COEFFICIENTS: tuple[int, ...] = (16, 48, 128, 192)


@dataclass(frozen=True)
class Baseline:
    """One baseline's result: its name, numbers kept per image and pooled PSNR in dB."""

    name: str
    numbers: int
    psnr_db: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def thumbnail(images: Tensor, side: int) -> Tensor:
    """Area-downsample ``images`` to ``side x side``, then bicubic back up, clamped to [0, 1]."""
    small = F.interpolate(images, size=(side, side), mode="area")
    up = F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False)
    return up.clamp(0, 1)


class PatchPCA:
    """Patch PCA fitted on training images: keep the first ``k`` coefficients of each 8x8 patch.

    ``PatchPCA(train_images).reconstruct(images, k)`` projects every non-overlapping 8x8x3
    patch on the first ``k`` principal components and back.
    """

    def __init__(self, train_images: Tensor, patch: int = PATCH) -> None:
        self.patch = patch
        self.mean, self.components, self.variances = fit_patch_pca(train_images, patch)

    def reconstruct(self, images: Tensor, k: int) -> Tensor:
        if not 0 <= k <= self.components.shape[0]:
            raise ValueError(f"k must be in [0, {self.components.shape[0]}], got {k}")
        n, c, h, w = images.shape
        rows = patch_vectors(images.float(), self.patch) - self.mean
        basis = self.components[:k]
        rec = (rows @ basis.T) @ basis + self.mean
        cols = rec.reshape(n, h // self.patch, w // self.patch, -1).permute(0, 3, 1, 2)
        return F.pixel_shuffle(cols, self.patch).clamp(0, 1)


def compute_baselines(val_images: Tensor, train_images: Tensor | None = None,
                      sides: Sequence[int] = THUMBNAIL_SIDES,
                      coefficients: Sequence[int] = PCA_COEFFICIENTS,
                      pca: PatchPCA | None = None) -> list[Baseline]:
    """Every baseline on ``val_images``; PCA is fitted on ``train_images`` (both (N, 3, H, W)),
    or given already fitted as ``pca``."""
    if (train_images is None) == (pca is None):
        raise ValueError("give exactly one of train_images and pca")
    h, w = val_images.shape[-2:]
    grid = (h // PATCH) * (w // PATCH)
    rows = [Baseline(f"thumbnail {s}x{s}, bicubic", 3 * s * s,
                     pooled_psnr(thumbnail(val_images, s), val_images)) for s in sides]
    if pca is None:
        assert train_images is not None
        pca = PatchPCA(train_images)
    rows += [Baseline(f"patch PCA, {k} coefficients", k * grid,
                      pooled_psnr(pca.reconstruct(val_images, k), val_images))
             for k in coefficients]
    return rows


def as_patches(images: Tensor, patch: int = PATCH) -> Tensor:
    """The non-overlapping patches of ``images`` (N, C, H, W) as images ``(M, C, p, p)``."""
    rows = patch_vectors(images, patch)
    return rows.reshape(rows.shape[0], images.shape[1], patch, patch)


def patch_spectrum(images: Tensor | Sequence[Tensor], patch: int = PATCH) -> Tensor:
    """Variances of the principal components of the 8x8x3 patches of ``images``, decreasing,
    ``(C * patch**2,)``. ``images``: a tensor (N, C, H, W) or a list of tensors of different
    sizes (full frames), in [0, 1], sides divisible by ``patch``."""
    if isinstance(images, Tensor):
        return fit_patch_pca(images, patch)[2]
    return fit_patch_pca(torch.cat([as_patches(x, patch) for x in images]), patch)[2]


def frame_baselines(frames: Sequence[Tensor], pca: PatchPCA,
                    coefficients: Sequence[int] = PCA_COEFFICIENTS) -> list[Baseline]:
    """Patch PCA with ``pca``'s basis (fitted on training crops) on full frames, (1, 3, H, W)
    each; PSNR pooled over every pixel of every frame, ``numbers`` per 8x8 patch."""
    rows = []
    for k in coefficients:
        se = sum(float(F.mse_loss(pca.reconstruct(x, k).double(), x.double(), reduction="sum"))
                 for x in frames)
        n = sum(x.numel() for x in frames)
        rows.append(Baseline(f"patch PCA, {k} coefficients", k,
                             pooled_psnr_from_mse(se / n)))
    return rows


#: Whole-crop baselines of the compact models (vector latents): PCA coefficient counts and
#: thumbnail sides.
CROP_PCA_COEFFICIENTS: tuple[int, ...] = (16, 64, 256)
CROP_THUMBNAIL_SIDES: tuple[int, ...] = (5, 8)
#: Training crops the whole-crop PCA is fitted on (at most).
CROP_PCA_FIT = 4096


def crop_baselines(val_images: Tensor, train_images: Tensor,
                   coefficients: Sequence[int] = CROP_PCA_COEFFICIENTS,
                   sides: Sequence[int] = CROP_THUMBNAIL_SIDES) -> list[Baseline]:
    """Baselines for a code of a few numbers per whole crop, on ``val_images`` (N, C, S, S) in
    [0, 1]: PCA of whole flattened crops keeping ``k`` coefficients, fitted on the first
    :data:`CROP_PCA_FIT` of ``train_images`` (more than ``max(coefficients)`` needed), and
    thumbnails of side ``s`` (``3 s**2`` numbers). Reconstructions are clamped to [0, 1], as the
    models' are; PSNR pooled over the set."""
    from ..compact import fit_crop_pca  # the compact models' own PCA

    rows = []
    if coefficients:
        mean, comps, _ = fit_crop_pca(train_images[:CROP_PCA_FIT], max(coefficients))
        flat = val_images.flatten(1).float() - mean
        for k in coefficients:
            c = comps[:k]
            rec = (mean + (flat @ c.T) @ c).reshape(val_images.shape).clamp(0, 1)
            rows.append(Baseline(f"crop PCA, {k} coefficients", k, pooled_psnr(rec, val_images)))
    rows += [Baseline(f"thumbnail {s}x{s}, bicubic", val_images.shape[1] * s * s,
                      pooled_psnr(thumbnail(val_images, s), val_images)) for s in sides]
    return sorted(rows, key=lambda b: b.numbers)
