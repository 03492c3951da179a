"""The linear patch path: DCT and PCA bases, whitening, and init_from_data."""

from __future__ import annotations

import torch

from hrm_vision.evaluation.baselines import PatchPCA, pooled_psnr
from hrm_vision.vae import MinimalVAE, TeacherVAE
from hrm_vision.vae.patches import PatchWhitening, dct_basis, fit_patch_pca, patch_vectors


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
