"""Thumbnail and patch-PCA baselines: small deterministic computations that can be checked."""

from __future__ import annotations

import pytest
import torch

from hrm_vision.evaluation.baselines import (
    PatchPCA,
    compute_baselines,
    pooled_psnr,
    thumbnail,
)


def test_pooled_psnr_is_over_the_whole_set() -> None:
    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    pred[0] = 0.1  # image 0 has MSE 0.01, image 1 is exact: pooled MSE 0.005
    assert pooled_psnr(pred, target) == pytest.approx(-10 * torch.log10(torch.tensor(0.005)))


def test_thumbnail_keeps_a_smooth_image_and_loses_detail() -> None:
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32).contiguous()
    assert pooled_psnr(thumbnail(ramp, 16), ramp) > 35
    checker = ((torch.arange(32)[:, None] + torch.arange(32)) % 2).float().expand(1, 3, 32, 32)
    assert pooled_psnr(thumbnail(checker, 16), checker) < 10


def test_pca_error_falls_with_k_and_is_exact_with_all(photo_batch) -> None:
    pca = PatchPCA(photo_batch)
    scores = [pooled_psnr(pca.reconstruct(photo_batch, k), photo_batch) for k in (4, 16, 64)]
    assert scores[0] < scores[1] < scores[2]
    assert torch.allclose(pca.reconstruct(photo_batch, 192), photo_batch, atol=1e-4)
    with pytest.raises(ValueError, match="k must be"):
        pca.reconstruct(photo_batch, 193)


def test_compute_baselines_counts_numbers(photo_batch) -> None:
    rows = {b.name: b for b in compute_baselines(photo_batch, photo_batch, sides=(8,),
                                                 coefficients=(16,))}
    assert rows["thumbnail 8x8, bicubic"].numbers == 192
    assert rows["patch PCA, 16 coefficients"].numbers == 256
    # on these crops the 16-coefficient PCA beats the 8x8 thumbnail (it keeps more numbers)
    assert rows["patch PCA, 16 coefficients"].psnr_db > rows["thumbnail 8x8, bicubic"].psnr_db
