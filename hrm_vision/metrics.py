"""Image-quality and latent-alignment metrics shared by training, evaluation and the IRP plugin.

**PSNR is pooled over the whole set**: ``10 log10(1 / MSE)`` of one mean squared error over every
pixel of every image in [0, 1], not a mean of per-image or per-batch PSNRs. Over batches, keep
the sample-weighted mean of :func:`mse` and convert once with :func:`psnr_from_mse`. SSIM comes
from torchmetrics; linear CKA is Kornblith et al., 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.functional.image import structural_similarity_index_measure


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Element-wise ``KL(N(mu, exp(logvar)) || N(0, 1))`` in nats, same shape as ``mu``."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def mse(prediction: Tensor, target: Tensor) -> float:
    """Mean squared error (float64) over every element of images ``(B, 3, H, W)`` in [0, 1],
    ``prediction`` clamped to [0, 1] first."""
    if prediction.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    diff = prediction.detach().double().clamp(0, 1) - target.detach().double()
    return float(diff.pow(2).mean())


def psnr_from_mse(mean_squared_error: float) -> float:
    """PSNR in dB of images in [0, 1] (data range 1) with this MSE; ``inf`` for an MSE of 0."""
    if mean_squared_error < 0 or math.isnan(mean_squared_error):
        raise ValueError(f"an MSE must be >= 0, got {mean_squared_error}")
    return math.inf if mean_squared_error == 0 else -10.0 * math.log10(mean_squared_error)


def psnr(prediction: Tensor, target: Tensor) -> float:
    """Pooled PSNR in dB of images in [0, 1] ``(B, 3, H, W)``: one MSE over the whole batch."""
    return psnr_from_mse(mse(prediction, target))


def ssim(prediction: Tensor, target: Tensor) -> float:
    """Mean SSIM (Gaussian 11x11 window) of images in [0, 1] (B, 3, H, W); 1.0 is identical."""
    return float(structural_similarity_index_measure(prediction.clamp(0, 1).float(),
                                                     target.float(), data_range=1.0))


def linear_cka(a: Tensor, b: Tensor) -> float:
    """Linear CKA in [0, 1] between representations ``a`` (N, ...) and ``b`` (N, ...) of the
    same N >= 2 inputs: 1 when one is an orthogonal transform and scaling of the other."""
    if a.shape[0] != b.shape[0] or a.shape[0] < 2:
        raise ValueError(f"linear_cka needs the same N >= 2 rows, got {a.shape[0]}, {b.shape[0]}")
    x, y = (t.reshape(t.shape[0], -1).double() for t in (a, b))
    x, y = x - x.mean(0), y - y.mean(0)
    # ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) from the N x N Gram matrices
    kx, ky = x @ x.T, y @ y.T
    hsic = (kx * ky).sum()
    denom = torch.sqrt((kx * kx).sum() * (ky * ky).sum())
    return float(hsic / denom) if denom > 0 else 0.0


def mean_over(loader: DataLoader, fn: Callable[[Tensor, Tensor], dict[str, float]]
              ) -> tuple[dict[str, float], int]:
    """Sample-weighted mean of ``fn(index, x) -> dict`` over a loader; returns (means, count)."""
    sums: dict[str, float] = {}
    count = 0
    for index, x in loader:
        for k, v in fn(index, x).items():
            sums[k] = sums.get(k, 0.0) + float(v) * x.shape[0]
        count += x.shape[0]
    return {k: v / max(count, 1) for k, v in sums.items()}, count


def error_image(reconstruction: Tensor, x: Tensor, gain: float = 10.0) -> Tensor:
    """``|reconstruction - x|`` times ``gain``, clamped to [0, 1]: where a model is wrong."""
    return ((reconstruction - x).abs() * gain).clamp(0, 1)


def rate_and_sample(model: nn.Module, x: Tensor, index: Tensor, mu: Tensor, logvar: Tensor
                    ) -> dict[str, float]:
    """Validation values of a batch ``x`` (B, C, H, W) in [0, 1] with posterior ``mu, logvar``:
    ``psnr_sample``, the MSE (a PSNR once pooled) of a posterior sample seeded by ``index[0]``,
    ``kl_per_element`` (nats) and ``bits_per_pixel``."""
    kl = gaussian_kl(mu, logvar).flatten(1)
    pixels = x.shape[-2] * x.shape[-1]
    return {"psnr_sample": mse(model.decode_sample(x, int(index[0])), x),
            "kl_per_element": float(kl.mean()),
            "bits_per_pixel": float(kl.sum(1).mean()) / (pixels * math.log(2))}
