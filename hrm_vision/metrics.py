"""Image-quality and latent-alignment metrics shared by training, evaluation and the IRP plugin.

PSNR and SSIM come from torchmetrics (not hand-written); linear CKA (Kornblith et al., 2019)
is a few lines of linear algebra that torchmetrics does not provide.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)


def psnr(prediction: Tensor, target: Tensor) -> float:
    """PSNR in dB of images in [0, 1] (B, 3, H, W), over the whole batch (data range 1)."""
    return float(peak_signal_noise_ratio(prediction.clamp(0, 1), target, data_range=1.0))


def ssim(prediction: Tensor, target: Tensor) -> float:
    """Mean SSIM (Gaussian 11x11 window) of images in [0, 1] (B, 3, H, W); 1.0 is identical."""
    return float(structural_similarity_index_measure(prediction.clamp(0, 1).float(),
                                                     target.float(), data_range=1.0))


def linear_cka(a: Tensor, b: Tensor) -> float:
    """Linear CKA between two sets of representations of the same N inputs.

    ``a`` is (N, ...) and ``b`` is (N, ...); each is flattened to (N, features). Returns a value
    in [0, 1]: 1 when one is an orthogonal transform and scaling of the other, near 0 when
    unrelated. Needs N >= 2.
    """
    if a.shape[0] != b.shape[0] or a.shape[0] < 2:
        raise ValueError(f"linear_cka needs the same N >= 2 rows, got {a.shape[0]}, {b.shape[0]}")
    x = a.reshape(a.shape[0], -1).double()
    y = b.reshape(b.shape[0], -1).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    # ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), computed with N x N Gram matrices (cheap for N
    # smaller than the feature count, which is the usual case for latents).
    kx, ky = x @ x.T, y @ y.T
    hsic = (kx * ky).sum()
    denom = torch.sqrt((kx * kx).sum() * (ky * ky).sum())
    return float(hsic / denom) if denom > 0 else 0.0
