"""Metrics: PSNR/SSIM from torchmetrics, linear CKA invariances."""

from __future__ import annotations

import math

import pytest
import torch

from hrm_vision.metrics import linear_cka, mse, psnr, psnr_from_mse, ssim


def test_psnr_and_ssim_known_values(photo_batch) -> None:
    x = photo_batch
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    mse = float(((noisy - x) ** 2).mean())
    assert psnr(noisy, x) == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert ssim(noisy, x) < 0.95


def test_psnr_is_pooled_not_averaged_per_batch() -> None:
    target = torch.full((2, 3, 4, 4), 0.5)
    prediction = target.clone()
    prediction[0] += 0.1  # image 0: MSE 0.01 (20 dB); image 1: MSE 1e-4 (40 dB)
    prediction[1] += 0.01
    assert psnr(prediction, target) == pytest.approx(-10 * math.log10((0.01 + 1e-4) / 2),
                                                     rel=1e-6)
    per_image = [psnr(prediction[i:i + 1], target[i:i + 1]) for i in range(2)]
    assert per_image == pytest.approx([20.0, 40.0], rel=1e-5)
    assert psnr(prediction, target) < sum(per_image) / 2 - 5  # 23 dB, not 30
    batches = [mse(prediction[i:i + 1], target[i:i + 1]) for i in range(2)]
    assert psnr_from_mse(sum(batches) / 2) == pytest.approx(psnr(prediction, target))


def test_psnr_edge_cases() -> None:
    x = torch.rand(1, 3, 4, 4)
    assert psnr(x, x) == math.inf
    assert psnr(x + 2.0, x) == psnr(torch.ones_like(x), x)  # the prediction is clamped
    with pytest.raises(ValueError, match="shapes differ"):
        mse(x, x[:, :2])
    with pytest.raises(ValueError, match="MSE must be >= 0"):
        psnr_from_mse(-1.0)


def test_linear_cka_invariances() -> None:
    a = torch.randn(64, 10)
    q, _ = torch.linalg.qr(torch.randn(10, 10))
    assert linear_cka(a, 3.0 * a @ q) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(a, torch.randn(64, 10)) < 0.5
    with pytest.raises(ValueError, match="same N"):
        linear_cka(a, a[:3])
