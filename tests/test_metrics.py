"""Metrics: PSNR/SSIM from torchmetrics, linear CKA invariances."""

from __future__ import annotations

import math

import pytest
import torch

from hrm_vision.metrics import linear_cka, psnr, ssim


def test_psnr_and_ssim_known_values(photo_batch) -> None:
    x = photo_batch
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    mse = float(((noisy - x) ** 2).mean())
    assert psnr(noisy, x) == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert ssim(noisy, x) < 0.95


def test_linear_cka_invariances() -> None:
    a = torch.randn(64, 10)
    q, _ = torch.linalg.qr(torch.randn(10, 10))
    assert linear_cka(a, 3.0 * a @ q) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(a, torch.randn(64, 10)) < 0.5
    with pytest.raises(ValueError, match="same N"):
        linear_cka(a, a[:3])
