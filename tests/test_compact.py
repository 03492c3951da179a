"""The compact pair: vector latents for fixed-size crops, budgets, linear start, persistence."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hrm_vision.compact import (
    CompactStudentVAE,
    CompactTeacherVAE,
    CompactVAE,
    crop_dct_basis,
    fit_crop_pca,
)
from hrm_vision.io import load, save
from hrm_vision.vae import VAEOutput, build_model, model_name

#: Tiny configurations (the architecture is the defaults', with narrow stages).
SMALL = [(CompactStudentVAE, {"base_channels": 4, "latent_dim": 16}),
         (CompactTeacherVAE, {"base_channels": 4, "latent_dim": 32})]


def crops(n: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth random 64x64 crops in [0, 1] (low-resolution noise upsampled), (n, C, 64, 64)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=64, mode="bilinear", align_corners=False)


class TestBuilding:
    def test_parameter_budgets_at_defaults(self) -> None:
        student, teacher = CompactStudentVAE(), CompactTeacherVAE()
        assert 0.4e6 <= student.num_parameters() <= 1.0e6
        assert 8 <= teacher.num_parameters() / student.num_parameters() <= 13

    def test_registered(self) -> None:
        for name, cls in (("compact_student", CompactStudentVAE),
                          ("compact_teacher", CompactTeacherVAE)):
            model = build_model(name, base_channels=4)
            assert type(model) is cls and model_name(model) == name

    @pytest.mark.parametrize("kwargs", [{"input_channels": 2}, {"image_size": 60},
                                        {"image_size": 32}, {"latent_dim": 0}])
    def test_bad_arguments(self, kwargs) -> None:
        with pytest.raises(ValueError):
            CompactStudentVAE(base_channels=4, **kwargs)

    def test_no_normalisation_layers(self) -> None:
        norms = [m for m in CompactTeacherVAE(base_channels=4).modules() if isinstance(
            m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm))]
        assert not norms


class TestForward:
    @pytest.mark.parametrize("cls,kwargs", SMALL)
    @pytest.mark.parametrize("channels", [3, 1])
    def test_shapes(self, cls, kwargs, channels) -> None:
        model = cls(input_channels=channels, **kwargs).eval()
        x = crops(2, channels)
        z = model.encode(x)
        assert z.shape == (2, kwargs["latent_dim"]) == (2, *model.latent_shape())
        x_hat = model.decode(z)
        assert x_hat.shape == x.shape
        assert x_hat.min() >= 0 and x_hat.max() <= 1
        out = model(x)
        assert isinstance(out, VAEOutput)
        assert out.mu.shape == out.logvar.shape == out.z.shape == z.shape

    def test_encode_is_deterministic_in_eval_and_samples_in_training(self) -> None:
        model = CompactStudentVAE(base_channels=4).eval()
        x = crops(2)
        assert torch.equal(model.encode(x), model.encode(x))
        assert torch.equal(model(x).z, model.encode(x))
        model.train()
        assert not torch.equal(model(x).z, model(x).z)

    @pytest.mark.parametrize("bad", [torch.rand(1, 3, 32, 32), torch.rand(1, 1, 64, 64),
                                     torch.rand(3, 64, 64)])
    def test_wrong_images_are_errors(self, bad) -> None:
        with pytest.raises(ValueError):
            CompactStudentVAE(base_channels=4).encode(bad)

    @pytest.mark.parametrize("bad", [torch.rand(1, 16), torch.rand(1, 64, 1, 1),
                                     torch.zeros(1, 64, dtype=torch.long)])
    def test_wrong_latents_are_errors(self, bad) -> None:
        with pytest.raises(ValueError):
            CompactStudentVAE(base_channels=4).decode(bad)


class TestLinearStart:
    def test_fitted_basis_is_pca(self) -> None:
        x = crops(200)
        mean, comps, std = fit_crop_pca(x, 16)
        assert torch.allclose(comps @ comps.T, torch.eye(16), atol=1e-4)
        assert torch.all(std[:-1] >= std[1:])
        centred = (x.flatten(1) - mean).double()
        ref = torch.linalg.svdvals(centred)[:16] / (len(x) - 1) ** 0.5
        assert torch.allclose(std.double(), ref, rtol=1e-3)

    def test_dct_basis_is_orthonormal_and_starts_at_the_means(self) -> None:
        comps, std = crop_dct_basis(3, 64, 64)
        assert torch.allclose(comps @ comps.T, torch.eye(64), atol=1e-5)
        assert torch.allclose(comps[0].reshape(3, 64, 64)[0], torch.full((64, 64), 1 / 64))
        assert torch.all(std[:-1] >= std[1:])

    @pytest.mark.parametrize("cls,kwargs", SMALL)
    @pytest.mark.parametrize("channels", [3, 1])
    def test_untrained_model_is_pca(self, cls, kwargs, channels) -> None:
        """After init_from_data the fresh model reconstructs exactly as PCA-latent_dim does,
        and its latent is the whitened PCA coefficients."""
        train, val = crops(300, channels, seed=1), crops(8, channels, seed=2)
        model = cls(input_channels=channels, **kwargs).eval()
        model.init_from_data(train)
        k = kwargs["latent_dim"]
        mean, comps, std = fit_crop_pca(train, k)
        coef = (val.flatten(1) - mean) @ comps.T
        pca = (mean + coef @ comps).reshape(val.shape).clamp(0, 1)
        z = model.encode(val)
        assert torch.allclose(z, coef / std, atol=1e-3)
        assert torch.allclose(model.decode(z), pca, atol=1e-4)

    def test_a_student_starts_in_its_teachers_coordinates(self) -> None:
        """With a compact teacher, the fresh student's latent is the teacher's first numbers
        whatever images each student sees; a teacher of other crops is not used."""
        teacher = CompactTeacherVAE(base_channels=4, latent_dim=32).eval()
        teacher.init_from_data(crops(200, seed=1))
        a, b = (CompactStudentVAE(base_channels=4, latent_dim=16).eval() for _ in range(2))
        a.init_from_data(crops(100, seed=2), teacher)
        b.init_from_data(crops(100, seed=3), teacher)
        x = crops(5, seed=4)
        assert torch.allclose(a.encode(x), teacher.encode(x)[:, :16], atol=1e-4)
        assert torch.allclose(a.encode(x), b.encode(x), atol=1e-5)
        own = CompactStudentVAE(base_channels=4, latent_dim=16).eval()
        own.init_from_data(crops(100, seed=2))
        assert not torch.allclose(own.encode(x), a.encode(x), atol=1e-2)
        grey = CompactStudentVAE(base_channels=4, latent_dim=16, input_channels=1).eval()
        grey.init_from_data(crops(100, 1, seed=2), teacher)  # RGB teacher: own PCA
        mean, comps, _ = fit_crop_pca(crops(100, 1, seed=2), 16)
        assert torch.allclose(grey.encoder.basis.components, comps)

    def test_linear_path_matches_the_model_at_the_start(self) -> None:
        model = CompactStudentVAE(base_channels=4, latent_dim=16).eval()
        model.init_from_data(crops(100))
        enc_w, enc_b, dec_w, dec_b = model.linear_path()
        x = crops(3, seed=5)
        z = model.encode(x)
        assert torch.allclose(x.flatten(1) @ enc_w.T + enc_b, z, atol=1e-4)
        assert torch.allclose((z @ dec_w.T + dec_b).reshape(x.shape).clamp(0, 1),
                              model.decode(z), atol=1e-5)

    def test_branches_learn_beyond_the_linear_start(self) -> None:
        """A few steps of plain MSE on a fixed batch move the model off its PCA start (the
        zero-started ends receive gradient) and lower the error."""
        torch.manual_seed(0)
        model = CompactStudentVAE(base_channels=4, latent_dim=16)
        x = crops(32, seed=3)
        model.init_from_data(crops(100, seed=4))
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.eval()
        start = torch.nn.functional.mse_loss(model.decode(model.encode(x)), x).item()
        for _ in range(40):
            loss = torch.nn.functional.mse_loss(model(x, sample=False).reconstruction, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        end = torch.nn.functional.mse_loss(model.decode(model.encode(x)), x).item()
        assert end < 0.9 * start
        assert model.decoder.stages[-2].weight.abs().sum() > 0


class TestPersistence:
    @pytest.mark.parametrize("cls,kwargs", SMALL)
    def test_state_dict_round_trip(self, cls, kwargs) -> None:
        model = cls(input_channels=1, **kwargs).eval()
        model.init_from_data(crops(100, 1))
        rebuilt = build_model(model_name(model), **model.arch_config()).eval()
        x = crops(2, 1, seed=9)
        assert not torch.equal(rebuilt.encode(x), model.encode(x))
        rebuilt.load_state_dict(model.state_dict())
        assert torch.equal(rebuilt.encode(x), model.encode(x))
        assert torch.equal(rebuilt.decode(model.encode(x)), model.decode(model.encode(x)))

    def test_safetensors_round_trip(self, tmp_path) -> None:
        pytest.importorskip("safetensors")
        model = CompactStudentVAE(base_channels=4, latent_dim=16).eval()
        model.init_from_data(crops(100))
        path = save(model, tmp_path / "compact.safetensors")
        loaded = load(path)
        x = crops(2, seed=3)
        assert torch.equal(loaded.encode(x), model.encode(x))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="needs the export extra")
def test_student_encoder_exports_to_onnx(tmp_path) -> None:
    """The encoder exports with only conv/linear/activation/reshape-type operators and ONNX
    Runtime reproduces the eager latent."""
    import onnx

    from hrm_vision.export import ort_session, run_onnx

    class Encode(torch.nn.Module):
        def __init__(self, vae: CompactVAE) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(x)

    model = CompactStudentVAE(base_channels=4).eval()
    model.init_from_data(crops(100))
    x = crops(2, seed=7)
    program = torch.onnx.export(Encode(model).eval(), (x,), dynamo=True, verbose=False)
    path = tmp_path / "encoder.onnx"
    program.save(str(path))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    allowed = {"Conv", "Gemm", "MatMul", "Relu", "SpaceToDepth", "DepthToSpace", "Reshape",
               "Flatten", "Add", "Sub", "Mul", "Div", "Concat", "Split", "Slice", "Transpose",
               "Constant", "Identity"}
    assert ops <= allowed, ops - allowed
    assert torch.allclose(run_onnx(ort_session(path), x), model.encode(x), atol=1e-4)
