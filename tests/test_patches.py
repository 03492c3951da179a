"""The linear patch path: DCT and PCA bases, whitening, and init_from_data."""

from __future__ import annotations

import math

import pytest
import torch

from hrm_vision.evaluation.baselines import PatchPCA, pooled_psnr
from hrm_vision.train.loss import kl_per_element
from hrm_vision.vae import MinimalVAE, TeacherVAE
from hrm_vision.vae.models import LOGVAR_INIT
from hrm_vision.vae.patches import (
    PatchWhitening,
    allocate_rate,
    dct_basis,
    fit_patch_pca,
    patch_vectors,
    posterior_kl,
)


def test_dct_basis_is_orthonormal_and_starts_with_patch_means() -> None:
    basis = dct_basis()
    assert basis.shape == (192, 192)
    assert torch.allclose(basis @ basis.T, torch.eye(192), atol=1e-5)
    # the first three rows are the (scaled) means of the R, G and B planes of a patch
    for c in range(3):
        row = basis[c].reshape(3, 8, 8)
        assert torch.allclose(row[c], torch.full((8, 8), 1 / 8))
        assert row.abs().sum() == row[c].abs().sum()


def test_patch_vectors_follow_pixel_unshuffle_order() -> None:
    x = torch.arange(2 * 3 * 16 * 8, dtype=torch.float32).reshape(2, 3, 16, 8)
    rows = patch_vectors(x)
    assert rows.shape == (2 * 2 * 1, 192)
    assert torch.equal(rows[1].reshape(3, 8, 8), x[0, :, 8:16, 0:8])


def test_pca_components_are_orthonormal_and_sorted(photo_batch) -> None:
    mean, comps, var = fit_patch_pca(photo_batch)
    assert mean.shape == (192,) and comps.shape == (192, 192)
    assert torch.allclose(comps @ comps.T, torch.eye(192), atol=1e-4)
    assert torch.all(var[:-1] >= var[1:])


def test_whitening_roundtrip_and_unit_variance(photo_batch) -> None:
    analysis, synthesis = PatchWhitening(), PatchWhitening(inverse=True)
    x = photo_batch
    assert torch.allclose(synthesis(analysis(x)), x, atol=1e-5)  # DCT start: lossless
    big = torch.cat([photo_batch.flip(-1), photo_batch, photo_batch.flip(-2)])
    basis = fit_patch_pca(big)
    analysis.set_basis(*basis)
    synthesis.set_basis(*basis)
    coeffs = analysis(big)
    assert torch.allclose(synthesis(coeffs), big, atol=1e-4)
    first16 = coeffs[:, :16].permute(1, 0, 2, 3).reshape(16, -1)
    assert torch.allclose(first16.var(1), torch.ones(16), rtol=0.05)


def test_init_from_data_makes_the_student_patch_pca(photo_batch) -> None:
    """A fresh student after init_from_data reconstructs exactly like 128-coefficient PCA."""
    model = MinimalVAE().eval()
    with torch.no_grad():
        before = pooled_psnr(model.decode(model.encode(photo_batch)), photo_batch)
        model.init_from_data(photo_batch)
        after = model.decode(model.encode(photo_batch))
    pca = PatchPCA(photo_batch).reconstruct(photo_batch, 128)
    assert torch.allclose(after, pca, atol=1e-4)
    assert pooled_psnr(after, photo_batch) > before


def test_init_from_data_makes_the_teacher_lossless(photo_batch) -> None:
    model = TeacherVAE().eval()
    model.init_from_data(photo_batch)
    with torch.no_grad():
        rec = model.decode(model.encode(photo_batch))
    assert pooled_psnr(rec, photo_batch) > 80


def test_basis_travels_in_the_state_dict(photo_batch) -> None:
    a = MinimalVAE()
    a.init_from_data(photo_batch)
    b = MinimalVAE()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.encoder.patches.weight, b.encoder.patches.weight)
    assert torch.equal(a.decoder.patches.bias, b.decoder.patches.bias)
    assert not torch.equal(a.decoder.patches.bias, MinimalVAE().decoder.patches.bias)


class TestRateAllocation:
    def test_an_element_the_decoder_ignores_gets_the_prior_spread(self) -> None:
        # element 2 has no decoder gain: noise there costs nothing, so it keeps s^2 = 1 and
        # spends only its mean's 0.5 nats; element 1 gets the rest: 0.5 (s^2 - ln s^2) = total - 0.5
        total = 0.5 + 0.5 * (0.1 - math.log(0.1))
        var = allocate_rate(torch.tensor([8.0, 0.0]), torch.tensor([1.0, 1.0]), total)
        assert var.tolist() == pytest.approx([0.1, 1.0], rel=1e-4)

    def test_hand_computed_lagrange_solution(self) -> None:
        # s_c^2 = lam / (lam + 2 g_c); with lam = 2 and gains (2, 1): s^2 = (1/3, 1/2)
        total = 0.5 * (1 / 3 + math.log(3)) + 0.5 * (1 / 2 + math.log(2))
        var = allocate_rate(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]), total)
        assert var.tolist() == pytest.approx([1 / 3, 1 / 2], rel=1e-4)
        assert float(posterior_kl(torch.ones(2), var.double()).sum()) == pytest.approx(total)

    def test_beats_every_uniform_code_of_the_same_rate(self) -> None:
        torch.manual_seed(0)
        gains, moments = torch.rand(32).pow(4) * 10, torch.rand(32) + 0.5
        uniform = torch.full((32,), math.exp(-3.0))
        total = float(posterior_kl(moments, uniform).sum())
        var = allocate_rate(gains, moments, total)
        assert float(posterior_kl(moments, var).sum()) == pytest.approx(total, rel=1e-4)
        assert float((gains * var).sum()) < 0.5 * float((gains * uniform).sum())

    def test_a_budget_below_the_means_rate_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="below what the means alone spend"):
            allocate_rate(torch.ones(4), torch.ones(4), 1.9)

    def test_init_from_data_keeps_the_rate_and_improves_the_sampled_decode(
            self, photo_batch) -> None:
        fitted, uniform = MinimalVAE(64, 8).eval(), MinimalVAE(64, 8).eval()
        fitted.init_from_data(photo_batch)
        uniform.init_from_data(photo_batch)
        uniform.encoder.logvar_head[1].bias.data.fill_(LOGVAR_INIT)
        results = []
        for model in (fitted, uniform):
            with torch.no_grad():
                post = model.posterior(photo_batch)
                torch.manual_seed(0)
                z = post.mu + torch.exp(0.5 * post.logvar) * torch.randn_like(post.mu)
                results.append((kl_per_element(post.mu, post.logvar),
                                pooled_psnr(model.decode(z).clamp(0, 1), photo_batch)))
        (kl_fit, psnr_fit), (kl_uniform, psnr_uniform) = results
        assert kl_fit == pytest.approx(kl_uniform, rel=0.02)
        assert psnr_fit > psnr_uniform + 3.0
