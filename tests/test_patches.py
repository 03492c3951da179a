"""The linear patch path (DCT and PCA bases, whitening, init_from_data), rate allocation, and
rate arithmetic: reverse water-filling against cases solved by hand, units of the rate."""

from __future__ import annotations

import math

import pytest
import torch

from hrm_vision import patches
from hrm_vision.evaluate import PatchPCA
from hrm_vision.metrics import psnr as pooled_psnr
from hrm_vision.patches import (
    PatchWhitening,
    allocate_rate,
    dct_basis,
    fit_patch_pca,
    patch_vectors,
    posterior_kl,
)
from hrm_vision.train.loss import kl_per_element
from hrm_vision.vae import MinimalVAE, TeacherVAE


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


def test_init_from_data_at_a_generous_budget_makes_the_student_patch_pca(photo_batch) -> None:
    """With 24 bits per pixel nothing is shrunk: the fresh student is 128-coefficient PCA."""
    model = MinimalVAE().eval()
    with torch.no_grad():
        before = pooled_psnr(model.decode(model.encode(photo_batch)), photo_batch)
        model.init_from_data(photo_batch, bits_per_pixel=24.0)
        after = model.decode(model.encode(photo_batch))
    pca = PatchPCA(photo_batch).reconstruct(photo_batch, 128)
    assert torch.allclose(after, pca, atol=1e-4)
    assert pooled_psnr(after, photo_batch) > before


def test_init_from_data_at_a_generous_budget_makes_the_teacher_lossless(photo_batch) -> None:
    model = TeacherVAE().eval()
    model.init_from_data(photo_batch, bits_per_pixel=24.0)
    with torch.no_grad():
        rec = model.decode(model.encode(photo_batch))
    assert pooled_psnr(rec, photo_batch) > 80


@pytest.mark.parametrize("cls", [MinimalVAE, TeacherVAE])
@pytest.mark.parametrize("bpp", [1.0, 6.0])
def test_a_fresh_model_spends_its_budget_on_its_images(photo_batch, cls, bpp) -> None:
    """The water-filling start: the KL on the fitted images is the budget, whatever the latent
    size, and its sampled decode is within 1 dB of the Gaussian bound at that rate."""
    model = cls().eval()
    model.init_from_data(photo_batch, bits_per_pixel=bpp)
    with torch.no_grad():
        post = model.posterior(photo_batch)
        nats = kl_per_element(post.mu, post.logvar) * model.latent_dim
        torch.manual_seed(0)
        z = post.mu + torch.exp(0.5 * post.logvar) * torch.randn_like(post.mu)
        psnr_z = pooled_psnr(model.decode(z), photo_batch)
    assert patches.bits_per_pixel(nats / model.latent_dim, model.latent_dim) == pytest.approx(
        bpp, rel=0.02)
    spectrum = fit_patch_pca(photo_batch)[2]
    lam = spectrum[: min(model.latent_dim, 192)]  # what the latent can carry; the rest is lost
    bound_mse = (patches.water_filling(lam, nats) * lam.numel()
                 + float(spectrum[lam.numel():].sum())) / 192
    assert psnr_z > -10 * math.log10(bound_mse) - 1.0


def test_a_component_the_budget_cannot_pay_for_costs_nothing(photo_batch) -> None:
    model = TeacherVAE().eval()
    model.init_from_data(photo_batch, bits_per_pixel=0.5)
    with torch.no_grad():
        post = model.posterior(photo_batch)
    idle = post.logvar[0, :, 0, 0] == 0  # s^2 = 1: the prior, and a mean of 0
    assert 100 < int(idle.sum()) < 512
    assert float(post.mu[:, idle].abs().max()) == 0.0


def test_a_budget_outside_0_to_24_bits_per_pixel_is_an_error(photo_batch) -> None:
    with pytest.raises(ValueError, match="bits_per_pixel"):
        MinimalVAE().init_from_data(photo_batch, bits_per_pixel=25.0)


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


# ---------------------------------------------------------------------- rate arithmetic
#: A spectrum whose water levels are easy on paper.
SPECTRUM = (4.0, 1.0, 0.25)


class TestWaterFilling:
    def test_two_active_components(self) -> None:
        # R = ln 4 with {4, 1} active: ln theta = (ln 4 + ln 1 - 2 ln 4) / 2 = -ln 2, theta = 0.5
        # (1 > 0.5 >= 0.25); distortion 0.5 + 0.5 + 0.25 = 1.25 over 3 numbers.
        assert patches.water_level(SPECTRUM, math.log(4)) == pytest.approx(0.5)
        assert patches.water_filling(SPECTRUM, math.log(4)) == pytest.approx(1.25 / 3)

    def test_one_active_component(self) -> None:
        # R = ln 2 on the largest alone: theta = 4 e^{-2 ln 2} = 1; distortion (1 + 1 + 0.25) / 3.
        assert patches.water_level(SPECTRUM, math.log(2)) == pytest.approx(1.0)
        assert patches.water_filling(SPECTRUM, math.log(2)) == pytest.approx(2.25 / 3)

    def test_every_component_active(self) -> None:
        # R = 4 ln 2: theta = exp((ln 4 + ln 1 + ln 0.25 - 8 ln 2) / 3) = 2^{-8/3}.
        theta = 2 ** (-8 / 3)
        assert patches.water_filling(SPECTRUM, 4 * math.log(2)) == pytest.approx(theta)

    def test_zero_rate_keeps_nothing(self) -> None:
        assert patches.water_filling(SPECTRUM, 0.0) == pytest.approx(sum(SPECTRUM) / 3)

    def test_order_of_the_spectrum_does_not_matter(self) -> None:
        assert patches.water_filling([0.25, 4.0, 1.0], 1.3) == patches.water_filling(SPECTRUM, 1.3)

    def test_level_spends_exactly_the_rate(self) -> None:
        lam = torch.rand(192, generator=torch.Generator().manual_seed(0)) ** 4
        for total in (0.5, 10.0, 256.0):
            theta = patches.water_level(lam, total)
            spent = 0.5 * (lam[lam > theta].double() / theta).log().sum()
            assert float(spent) == pytest.approx(total, rel=1e-6)

    def test_more_rate_less_error_and_never_worse_than_uniform(self) -> None:
        lam = torch.rand(192, generator=torch.Generator().manual_seed(1)) ** 3
        errors = [patches.water_filling(lam, r * 128) for r in (0.25, 0.5, 1.0, 2.0)]
        assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]
        for r in (0.25, 2.0):
            assert patches.water_filling(lam, r * 128) <= patches.uniform_allocation(lam, r, 128)

    def test_bad_rate_is_refused(self) -> None:
        with pytest.raises(ValueError, match="rate"):
            patches.water_filling(SPECTRUM, -1.0)
        with pytest.raises(ValueError, match="spectrum"):
            patches.water_filling([], 1.0)


class TestUniformAllocation:
    def test_hand_case(self) -> None:
        # two components at 0.5 ln 2 nats each: error halves on {4, 1}, 0.25 dropped.
        assert patches.uniform_allocation(SPECTRUM, 0.5 * math.log(2), 2) == pytest.approx(2.75 / 3)
        # the same total rate (ln 2) water-filled: 2.25 / 3, lower
        assert patches.water_filling(SPECTRUM, math.log(2)) < patches.uniform_allocation(
            SPECTRUM, 0.5 * math.log(2), 2)

    def test_components_out_of_range(self) -> None:
        with pytest.raises(ValueError, match="components"):
            patches.uniform_allocation(SPECTRUM, 1.0, 4)


class TestUnits:
    def test_bits_per_pixel(self) -> None:
        # 2 nats x 128 channels per 64 pixels = 4 nats per pixel = 5.77 bits per pixel
        assert patches.bits_per_pixel(2.0, 128) == pytest.approx(4 / math.log(2))
        assert patches.bits_per_pixel(2.0, 512) == pytest.approx(
            4 * patches.bits_per_pixel(2.0, 128))
