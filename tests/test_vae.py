"""TeacherVAE and MinimalVAE: budgets, shapes, determinism, contracts, persistence; the latent
adapter's start from the two models' linear paths, and cross-decoding."""

from __future__ import annotations

import pytest
import torch

from hrm_vision.io import model_entry, save_checkpoint
from hrm_vision.vae import (
    LatentAdapter,
    MinimalVAE,
    TeacherVAE,
    TinyVAE,
    VAEOutput,
    build_model,
    count_macs,
)

SMALL = [(TeacherVAE, {"base_channels": 8, "latent_dim": 16, "blocks_per_stage": 1}),
         (MinimalVAE, {"base_channels": 8, "latent_dim": 16})]


class TestBuilding:
    def test_parameter_budgets_at_defaults(self) -> None:
        teacher, student = TeacherVAE(), MinimalVAE(latent_dim=128, base_channels=32)
        assert 8e6 <= teacher.num_parameters() <= 12e6
        assert 0.9e6 <= student.num_parameters() <= 1.3e6
        assert teacher.num_parameters() / student.num_parameters() >= 8

    def test_stage_counts(self) -> None:
        assert len(TeacherVAE().encoder.stages) == 4
        assert len(MinimalVAE().encoder.stages) == 3
        assert len(MinimalVAE().decoder.stages) == 3

    def test_no_normalisation_layers(self) -> None:
        """Nothing to fold at export and no train/eval difference in the forward pass."""
        for model in (TeacherVAE(), MinimalVAE()):
            norms = [m for m in model.modules() if isinstance(
                m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm))]
            assert not norms

    def test_tinyvae_alias(self) -> None:
        assert TinyVAE is MinimalVAE

    @pytest.mark.parametrize("size", [32, 64])
    @pytest.mark.parametrize("cls,latent", [(TeacherVAE, 512), (MinimalVAE, 128)])
    def test_latent_shapes(self, cls, latent, size) -> None:
        model = cls().eval()
        with torch.no_grad():
            z = model.encode(torch.rand(2, 3, size, size))
        assert z.shape == (2, latent, size // 8, size // 8)
        assert model.latent_shape(size, size) == (latent, size // 8, size // 8)

    def test_student_does_far_fewer_macs(self) -> None:
        ratio = count_macs(TeacherVAE()) / count_macs(MinimalVAE())
        assert ratio >= 5

    def test_build_model_by_name_and_errors(self) -> None:
        assert isinstance(build_model("tinyvae", latent_dim=8, base_channels=8), MinimalVAE)
        with pytest.raises(ValueError, match="unknown model 'vgg'"):
            build_model("vgg")
        with pytest.raises(ValueError, match="bad architecture arguments"):
            build_model("tinyvae", depth=3)

    def test_arch_config_rebuilds(self) -> None:
        model = TeacherVAE(latent_dim=16, base_channels=8, blocks_per_stage=1)
        clone = TeacherVAE(**model.arch_config())
        assert clone.num_parameters() == model.num_parameters()


@pytest.mark.parametrize("cls,kwargs", SMALL)
class TestForward:
    def test_encode_deterministic_in_eval(self, cls, kwargs) -> None:
        model = cls(**kwargs).eval()
        x = torch.rand(4, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model.encode(x), model.encode(x))
            out = model(x)
        assert torch.equal(out.z, out.mu)

    def test_train_forward_samples(self, cls, kwargs) -> None:
        model = cls(**kwargs).train()
        x = torch.rand(4, 3, 32, 32)
        a, b = model(x), model(x)
        assert isinstance(a, VAEOutput)
        assert not torch.equal(a.z, b.z)
        assert not torch.equal(a.z, a.mu)

    def test_explicit_sample_flag_in_eval(self, cls, kwargs) -> None:
        model = cls(**kwargs).eval()
        with torch.no_grad():
            out = model(torch.rand(2, 3, 32, 32), sample=True)
        assert not torch.equal(out.z, out.mu)

    def test_training_decode_clamps_with_the_identitys_gradient(self, cls, kwargs) -> None:
        model = cls(**kwargs).train()
        z = (torch.randn(2, kwargs["latent_dim"], 4, 4) * 50).requires_grad_()
        y = model.decode(z)
        assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
        raw = model.decoder(z)
        weights = torch.randn(y.shape)
        (grad,) = torch.autograd.grad((y * weights).sum(), z)
        (expected,) = torch.autograd.grad((raw * weights).sum(), z)  # as if not clamped
        assert torch.allclose(grad, expected, atol=1e-5)

    def test_decode_in_unit_range_and_shape(self, cls, kwargs) -> None:
        model = cls(**kwargs).eval()
        with torch.no_grad():
            y = model.decode(torch.randn(3, kwargs["latent_dim"], 4, 4) * 50)
        assert y.shape == (3, 3, 32, 32)
        assert y.min() >= 0 and y.max() <= 1

    def test_posterior_and_typed_output(self, cls, kwargs) -> None:
        model = cls(**kwargs).eval()
        x = torch.rand(2, 3, 32, 32)
        mu, logvar = model.posterior(x)
        out = model(x)
        assert torch.allclose(out.mu, mu) and torch.allclose(out.logvar, logvar)
        assert out.reconstruction.shape == x.shape

    @pytest.mark.parametrize("bad,message", [
        (torch.rand(3, 32, 32), "rank 3"),
        (torch.rand(1, 1, 32, 32), "3 RGB channels"),
        (torch.rand(1, 32, 32, 3), "3 RGB channels"),
        (torch.rand(1, 3, 30, 32), "divisible by 8"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "float images"),
    ])
    def test_bad_images_raise_value_error(self, cls, kwargs, bad, message) -> None:
        with pytest.raises(ValueError, match=message):
            cls(**kwargs).encode(bad)

    def test_bad_latent_raises(self, cls, kwargs) -> None:
        with pytest.raises(ValueError, match=f"\\(B, {kwargs['latent_dim']}, H/8, W/8\\)"):
            cls(**kwargs).decode(torch.rand(1, kwargs["latent_dim"] + 1, 4, 4))

    def test_gradients_reach_every_parameter(self, cls, kwargs) -> None:
        model = cls(**kwargs).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.rand(4, 3, 32, 32)
        for _ in range(3):  # zero-initialised branch ends: gradients reach deeper each step
            opt.zero_grad()
            out = model(x)
            (out.reconstruction - x).pow(2).mean().add(out.logvar.pow(2).mean()).backward()
            opt.step()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        assert not missing

    def test_starts_as_its_linear_patch_path(self, cls, kwargs) -> None:
        """Zero-initialised branch ends: at construction mu is the linear path alone."""
        model = cls(**kwargs).eval()
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            linear = model.encoder.linear(model.encoder.patches(x))
            assert torch.allclose(model.encode(x), linear)
            assert torch.allclose(model.posterior(x).logvar, torch.full_like(linear, -4.0))


class TestSaving:
    @pytest.mark.parametrize("cls,kwargs", SMALL)
    def test_state_dict_roundtrip_gives_identical_outputs(self, cls, kwargs) -> None:
        a = cls(**kwargs)
        a.init_from_data(torch.rand(64, 3, 32, 32))  # buffers off their data-free start
        with torch.no_grad():
            for p in a.parameters():
                p.add_(0.01 * torch.randn_like(p))
        a.eval()
        b = cls(**kwargs).eval()
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            assert not torch.equal(a.encode(x), b.encode(x))
            b.load_state_dict(a.state_dict())
            assert torch.equal(a.encode(x), b.encode(x))
            assert torch.equal(a(x).reconstruction, b(x).reconstruction)

    def test_seed_deployment_snippet(self, tmp_path, monkeypatch, photo_batch) -> None:
        """The README's deployment snippet, run as written against a checkpoint saved here."""
        trained = MinimalVAE(latent_dim=128, base_channels=32)
        trained.init_from_data(photo_batch)
        save_checkpoint(model_entry(trained, "student"), tmp_path / "checkpoints/tinyvae_best.pth")
        monkeypatch.chdir(tmp_path)
        image = photo_batch[:1]

        from hrm_vision.vae import MinimalVAE as SnippetVAE
        model = SnippetVAE(latent_dim=128, base_channels=32)
        checkpoint = torch.load('checkpoints/tinyvae_best.pth')
        model.load_state_dict(checkpoint['student_state_dict'])
        model.eval()
        with torch.no_grad():
            latent = model.encode(image)
            reconstruction = model.decode(latent)

        assert latent.shape == (1, 128, 4, 4)
        assert reconstruction.shape == (1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(reconstruction, trained.eval().decode(trained.encode(image)))


# ---------------------------------------------------------------------- the latent adapter
def test_linear_path_maps_match_the_models(photo_batch) -> None:
    model = MinimalVAE(latent_dim=16, base_channels=8).eval()
    model.init_from_data(photo_batch)
    enc_w, enc_b, dec_w, dec_b = model.linear_path()
    patches = torch.nn.functional.pixel_unshuffle(photo_batch, 8)  # (B, 192, 4, 4)
    z = torch.einsum("lp,bphw->blhw", enc_w, patches) + enc_b[None, :, None, None]
    with torch.no_grad():  # fresh model: the nonlinear branches are still zero
        assert torch.allclose(model.encode(photo_batch), z, atol=1e-4)
        rec = torch.einsum("pl,blhw->bphw", dec_w, z) + dec_b[None, :, None, None]
        expected = model.decode(z)
    assert torch.allclose(torch.nn.functional.pixel_shuffle(rec, 8).clamp(0, 1), expected,
                          atol=1e-4)


@pytest.mark.parametrize("vector", [True, False])
def test_adapter_fit_recovers_a_linear_map_in_either_layout(vector: bool) -> None:
    torch.manual_seed(0)
    adapter, truth = LatentAdapter(4, 8, vector=vector), LatentAdapter(4, 8, vector=vector)
    z = torch.randn(64, 4) if vector else torch.randn(16, 4, 2, 3)
    with torch.no_grad():
        adapter.fit(z, truth(z))
    assert torch.allclose(adapter.proj.weight, truth.proj.weight, atol=1e-4)
    assert torch.allclose(adapter.proj.bias, truth.proj.bias, atol=1e-4)


@pytest.mark.parametrize("vector", [True, False])
def test_adapter_fit_drops_what_only_some_photographs_hold(vector: bool) -> None:
    """Teacher numbers 0-3 follow one map of the student's latent everywhere; 4-7 a different
    map on each of 20 photographs. With the photographs given, 0-3 keep their map and 4-7 are
    shrunk towards their means; without, both are fitted."""
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(20).repeat_interleave(30)
    z = torch.randn(600, 4, generator=g) if vector else torch.randn(600, 4, 1, 2, generator=g)
    flat = z.movedim(1, -1).reshape(600, -1, 4)
    shared = torch.randn(4, 4, generator=g)
    own = torch.randn(20, 4, 4, generator=g)[groups]  # each photograph's map
    t = torch.cat([flat @ shared, torch.einsum("npi,nio->npo", flat, own)], dim=-1)
    t = t.reshape(600, *z.shape[2:], 8).movedim(-1, 1)
    plain, grouped = LatentAdapter(4, 8, vector=vector), LatentAdapter(4, 8, vector=vector)
    with torch.no_grad():
        plain.fit(z, t)
        grouped.fit(z, t, groups)
    w_plain, w = (a.proj.weight.reshape(8, 4) for a in (plain, grouped))
    assert torch.allclose(w[:4], shared.T, atol=1e-3)
    assert w[4:].norm() < 0.5 * w_plain[4:].norm()


def test_adapter_fit_needs_more_vectors_than_student_numbers() -> None:
    adapter = LatentAdapter(4, 8, vector=True)
    before = adapter.proj.weight.clone()
    with pytest.raises(ValueError, match="more latent vectors than numbers"):
        adapter.fit(torch.randn(4, 4), torch.randn(4, 8))
    assert torch.equal(adapter.proj.weight, before)


@pytest.mark.parametrize("name,size", [("teacher", 32), ("tinyvae", 32), ("compact_student", 64),
                                       ("compact_teacher", 64)])
def test_channels_last_gives_the_same_map_and_gradients(name: str, size: int) -> None:
    """The pixel rearrangements take another route on channels-last tensors (whole pixels,
    permuted convolution weights): outputs and every gradient must match the plain route."""
    torch.manual_seed(0)
    kwargs = {"base_channels": 4, "latent_dim": 16} | ({"blocks_per_stage": 1}
                                                        if "teacher" in name else {})
    plain = build_model(name, **kwargs).train()
    with torch.no_grad():  # random weights everywhere: zero-initialised branch ends live too
        for p in plain.parameters():
            p.normal_(0.0, 0.1)
    fast = build_model(name, **kwargs).train()
    fast.load_state_dict(plain.state_dict())
    fast.to(memory_format=torch.channels_last)
    x = torch.rand(3, 3, size, size)
    outputs = []
    for model, images in ((plain, x), (fast, x.contiguous(memory_format=torch.channels_last))):
        out = model(images, sample=False)  # a sample's noise is drawn in memory order
        (out.reconstruction.sum() + out.mu.pow(2).sum()).backward()
        outputs.append((out.mu, out.reconstruction, [p.grad for p in model.parameters()]))
    (mu_a, rec_a, grads_a), (mu_b, rec_b, grads_b) = outputs
    for a, b in zip([mu_a, rec_a, *grads_a], [mu_b, rec_b, *grads_b], strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.detach().abs().max()))
