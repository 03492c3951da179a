"""The whole objective (hrm_vision.train.loss): the terms in nats per image (units, floors,
temperature, shares); each term responds to its input, gradients reach only the intended
parameters, the reconstruction's scale sets its weight, perceptual backbones load offline."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torchvision.models import vgg16

from hrm_vision.train import loss as obj
from hrm_vision.train.loss import (
    TERMS,
    VGG_LAYERS,
    DistillLoss,
    TeacherFeatures,
    TeacherTargets,
    VGG16Features,
    adapt,
    build_perceptual,
    find_vgg16_weights,
    kl_nats,
    latent_distillation,
    latent_distillation_nats,
    output_distillation_nll,
    teacher_closer,
)
from hrm_vision.train.trainer import Phase
from hrm_vision.vae import LatentAdapter, MinimalVAE, TeacherVAE


def _images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 8, 8, generator=g)
    return x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)


class TestGaussianNLL:
    def test_is_the_normal_log_likelihood_summed_per_image(self) -> None:
        x, rec = _images()
        ls = torch.tensor(math.log(0.03))
        expected = -Normal(rec, 0.03).log_prob(x).flatten(1).sum(1).mean()
        assert float(obj.gaussian_nll(rec, x, ls)) == pytest.approx(float(expected), rel=1e-5)

    def test_one_scale_per_channel(self) -> None:
        x, rec = _images()
        sig = torch.tensor([0.02, 0.05, 0.1])
        expected = -Normal(rec, sig.view(1, 3, 1, 1)).log_prob(x).flatten(1).sum(1).mean()
        assert float(obj.gaussian_nll(rec, x, sig.log())) == pytest.approx(float(expected),
                                                                           rel=1e-5)
        with pytest.raises(ValueError, match="scales"):
            obj.gaussian_nll(rec, x, torch.zeros(2))

    def test_mask_drops_numbers(self) -> None:
        x, rec = _images()
        mask = torch.zeros_like(x)
        mask[:, 0] = 1
        ls = torch.tensor(-3.0)
        assert float(obj.gaussian_nll(rec, x, ls, mask)) == pytest.approx(
            float(obj.gaussian_nll(rec[:, :1], x[:, :1], ls)), rel=1e-5)

    def test_a_scattered_mask_with_per_channel_scales_keeps_the_per_number_sum(self) -> None:
        x, rec = _images()
        mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.3).float()
        sig = torch.tensor([0.02, 0.05, 0.1])
        per_number = -Normal(rec, sig.view(1, 3, 1, 1)).log_prob(x) * mask
        assert float(obj.gaussian_nll(rec, x, sig.log(), mask)) == pytest.approx(
            float(per_number.flatten(1).sum(1).mean()), rel=1e-5)

    def test_calibrate_sets_the_rms_error(self) -> None:
        x, rec = _images()
        scale = obj.GaussianScale()
        scale.calibrate(rec, x)
        assert float(scale.sigma.detach()) == pytest.approx(float((rec - x).pow(2).mean().sqrt()),
                                                   rel=1e-5)
        # the calibrated scale is where the NLL is lowest
        base = float(scale(rec, x).detach())
        for factor in (0.8, 1.25):
            other = obj.gaussian_nll(rec, x, scale.log_sigma.detach() + math.log(factor))
            assert float(other) > base


class TestKL:
    def test_channel_floor_raises_each_channel_to_its_floor(self) -> None:
        mu, logvar = torch.randn(4, 6, 2, 2), torch.randn(4, 6, 2, 2) - 2
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)  # per element, by hand
        per_channel = kl.sum(dim=(2, 3)).mean(0)  # nats per image in each channel
        expected = per_channel.clamp(min=1.5 * 2 * 2).sum()
        assert float(obj.kl_nats(mu, logvar, 1.5, "channel")) == pytest.approx(
            float(expected), rel=1e-5)

    def test_no_floor_is_the_sum_of_element_kls(self) -> None:
        mu, logvar = torch.randn(4, 6, 2, 2), torch.randn(4, 6, 2, 2) - 2
        q = Normal(mu, (0.5 * logvar).exp())
        expected = kl_divergence(q, Normal(0.0, 1.0)).flatten(1).sum(1).mean()
        for mode in obj.FREE_BITS_MODES:
            assert float(obj.kl_nats(mu, logvar, 0.0, mode)) == pytest.approx(float(expected),
                                                                              rel=1e-5)

    def test_total_floor_lets_channels_trade_rate(self) -> None:
        # channel 0 spends a lot, channel 1 almost nothing; the total is above the floor
        mu = torch.zeros(2, 2, 1, 1)
        mu[:, 0] = 3.0
        mu.requires_grad_(True)
        logvar = torch.zeros(2, 2, 1, 1)
        total = obj.kl_nats(mu, logvar, 1.0, "total")  # 4.5 nats > floor 2
        channel = obj.kl_nats(mu, logvar, 1.0, "channel")  # max(4.5, 1) + max(0, 1)
        assert float(total.detach()) == pytest.approx(4.5)
        assert float(channel.detach()) == pytest.approx(5.5)
        (grad_total,) = torch.autograd.grad(total, mu)
        assert float(grad_total[:, 0].abs().sum()) > 0

    def test_binding_floor_gives_no_gradient(self) -> None:
        mu = torch.full((2, 3, 2, 2), 0.1, requires_grad=True)
        kl = obj.kl_nats(mu, torch.zeros(2, 3, 2, 2), 2.0, "total")
        assert float(kl.detach()) == pytest.approx(2.0 * 12)
        (grad,) = torch.autograd.grad(kl, mu)
        assert float(grad.abs().sum()) == 0.0
        with pytest.raises(ValueError, match="mode"):
            obj.kl_nats(mu, mu, 1.0, "element")

    def test_rate_target_moves_the_multiplier_towards_the_target(self) -> None:
        target = obj.RateTarget(2.0, initial=0.1)
        assert target.update(4.0) > 0.1
        low = obj.RateTarget(2.0, initial=0.1)
        assert low.update(1.0) < 0.1
        assert obj.RateTarget(2.0, initial=0.1).update(2.0) == pytest.approx(0.1)
        assert "multiplier" in target.state_dict()

    def test_a_rate_far_above_the_target_grows_the_multiplier_by_a_bounded_step(self) -> None:
        """A near-lossless start spends thousands of times the target: the step is capped (it
        overflowed ``math.exp`` before), and still grows the multiplier."""
        far = obj.RateTarget(6.0, initial=0.1, step_size=0.5)
        assert far.update(1e6) == pytest.approx(0.1 * math.exp(0.5))
        assert far.update(12.0) == pytest.approx(0.1 * math.exp(1.0))  # at 2x: uncapped
        for _ in range(100):
            far.update(1e6)
        assert far.update(1e6) == obj.MULTIPLIER_RANGE[1]
        for _ in range(100):
            far.update(0.0)
        assert far.update(0.0) == pytest.approx(obj.MULTIPLIER_RANGE[0])


class TestDistillation:
    def test_latent_term_at_t1_is_the_gaussian_kl(self) -> None:
        g = torch.Generator().manual_seed(0)
        mt, ms = torch.randn(3, 5, 2, 2, generator=g), torch.randn(3, 5, 2, 2, generator=g)
        vt = torch.rand(3, 5, 2, 2, generator=g) + 0.1
        vs = torch.rand(3, 5, 2, 2, generator=g) + 0.1
        expected = kl_divergence(Normal(mt, vt.sqrt()), Normal(ms, vs.sqrt()))
        assert float(obj.latent_distillation_nats(mt, vt, ms, vs, 1.0)) == pytest.approx(
            float(expected.flatten(1).sum(1).mean()), rel=1e-5)

    def test_temperature_changes_the_loss(self) -> None:
        mt, ms = torch.zeros(2, 4, 1, 1), torch.ones(2, 4, 1, 1)
        vt, vs = torch.full((2, 4, 1, 1), 0.5), torch.full((2, 4, 1, 1), 0.2)
        t1, t3 = (float(obj.latent_distillation_nats(mt, vt, ms, vs, t)) for t in (1.0, 3.0))
        assert t3 < t1
        # equal means: only the spread term, which widening both does not change
        same1, same3 = (float(obj.latent_distillation_nats(mt, vt, mt, vs, t)) for t in (1.0, 3.0))
        assert same1 == pytest.approx(same3) and same1 > 0
        with pytest.raises(ValueError, match="temperature"):
            obj.latent_distillation_nats(mt, vt, ms, vs, 0.0)

    def test_output_term_uses_the_scale_without_setting_it(self) -> None:
        x, teacher = _images(1)
        student = teacher.clone().add_(0.02).requires_grad_(True)
        scale = obj.GaussianScale(0.05)
        nll = obj.output_distillation_nll(student, teacher, scale.log_sigma)
        assert float(nll) == pytest.approx(float(obj.gaussian_nll(student, teacher,
                                                                  scale.log_sigma)))
        nll.backward()
        assert scale.log_sigma.grad is None and student.grad is not None


class TestShares:
    def test_a_sharper_scale_moves_the_reconstruction_share(self) -> None:
        torch.manual_seed(0)
        net = torch.nn.Conv2d(3, 6, 1)
        x, _ = _images()

        def shares(sigma: float) -> tuple[dict[str, float], dict[str, float]]:
            h = net(x)
            mu, logvar = h[:, :3], h[:, 3:] - 3
            rec = (x + mu).clamp(0, 1)
            terms = {"recon": 0.3 * obj.gaussian_nll(rec, x, torch.tensor(math.log(sigma))),
                     "kl": 0.1 * obj.kl_nats(mu, logvar)}
            return obj.value_shares(terms), obj.gradient_shares(terms, list(net.parameters()))

        (v_wide, g_wide), (v_sharp, g_sharp) = shares(1.0), shares(0.01)
        assert g_sharp["recon"] > g_wide["recon"] and v_sharp["recon"] > v_wide["recon"]
        assert sum(g_sharp.values()) == pytest.approx(1.0)

    def test_a_term_that_does_not_reach_the_parameters_has_no_gradient_share(self) -> None:
        p = torch.nn.Parameter(torch.ones(3))
        shares = obj.gradient_shares({"a": (p * 2).sum(), "b": torch.tensor(5.0)}, [p])
        assert shares == {"a": 1.0, "b": 0.0}
        assert obj.value_shares({"a": -3.0, "b": 1.0}) == {"a": 0.75, "b": 0.25}


@pytest.fixture
def models() -> tuple[MinimalVAE, LatentAdapter, TeacherVAE]:
    return (MinimalVAE(latent_dim=8, base_channels=8), LatentAdapter(8, 16),
            TeacherVAE(latent_dim=16, base_channels=8, blocks_per_stage=1).eval())


def teacher_targets(teacher: TeacherVAE, x: torch.Tensor) -> TeacherTargets:
    with torch.no_grad():
        out = teacher(x)
    return TeacherTargets(out.mu, out.logvar, out.reconstruction)


class TestTerms:
    def test_all_terms_finite_and_total_is_weighted_sum(self, models, photo_batch) -> None:
        student, adapter, teacher = models
        x = photo_batch[:4]
        loss = DistillLoss(perceptual=TeacherFeatures(teacher))
        out = student(x)
        terms = loss(x, out, adapt(adapter, out.mu, out.logvar), teacher_targets(teacher, x))
        assert set(terms) == {*TERMS, "total"}
        assert all(torch.isfinite(v) for v in terms.values())
        # the two Gaussian NLLs may be negative (a small scale), the divergences may not
        assert all(terms[k] > 0 for k in ("kl", "distill_latent", "perceptual"))
        expected = sum(loss.weights[k] * terms[k] for k in TERMS)
        assert torch.allclose(terms["total"], expected)

    @pytest.mark.parametrize("term,params", [
        ("recon", {"student"}),
        ("kl", {"student.encoder"}),
        ("distill_latent", {"student.encoder", "adapter"}),
        ("distill_recon", {"student"}),
        ("perceptual", {"student"}),
    ])
    def test_gradient_reaches_only_intended_parameters(self, models, photo_batch, term,
                                                       params) -> None:
        student, adapter, teacher = models
        x = photo_batch[:4]
        weights = {f"{k}_weight": 0.0 for k in TERMS}
        weights[f"{term}_weight"] = 1.0
        loss = DistillLoss(**weights, kl_free_bits=0.0, perceptual=TeacherFeatures(teacher))
        out = student(x)
        loss(x, out, adapt(adapter, out.mu, out.logvar),
             teacher_targets(teacher, x))["total"].backward()
        named = {**{f"student.{n}": p for n, p in student.named_parameters()},
                 **{f"adapter.{n}": p for n, p in adapter.named_parameters()},
                 **{f"teacher.{n}": p for n, p in teacher.named_parameters()}}
        got = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
        for n in named:
            intended = any(n.startswith(prefix + ".") for prefix in params)
            if n.startswith("teacher") or not intended:
                assert n not in got, f"{term} should not reach {n}"
        assert any(n.startswith(tuple(params)) for n in got), f"{term} reaches nothing"

    def test_recon_responds_to_reconstruction(self, models, photo_batch) -> None:
        student, adapter, _ = models
        x = photo_batch[:4]
        out = student(x)
        loss = DistillLoss(distill_latent_weight=0, distill_recon_weight=0, perceptual_weight=0)
        base = loss(x, out, None, None)
        perfect = loss(x, out._replace(reconstruction=x), None, None)
        # a perfect reconstruction leaves the Gaussian's normalising constant, per number
        constant = x[0].numel() * (math.log(0.1) + 0.5 * math.log(2 * math.pi))
        assert float(perfect["recon"].detach()) == pytest.approx(constant, rel=1e-5)
        assert perfect["recon"] < base["recon"]
        assert base["distill_latent"] == 0 and base["perceptual"] == 0

    def test_terms_are_nats_per_image(self, models, photo_batch) -> None:
        """Summed over an image's numbers: a batch of the same image twice gives the same value
        as one image, and a four times larger image four times the reconstruction term."""
        student = models[0]
        loss = DistillLoss(distill_latent_weight=0, distill_recon_weight=0, perceptual_weight=0,
                           kl_free_bits=0.0)
        x = photo_batch[:1]
        one, two = (loss(b, student(b, sample=False), None, None)
                    for b in (x, x.repeat(2, 1, 1, 1)))
        assert float(one["recon"]) == pytest.approx(float(two["recon"]), rel=1e-5)
        big = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        rec = torch.nn.functional.interpolate(student(x, sample=False).reconstruction,
                                              scale_factor=2, mode="nearest")
        out_big = student(big, sample=False)._replace(reconstruction=rec)
        assert float(loss(big, out_big, None, None)["recon"]) == pytest.approx(
            4 * float(one["recon"]), rel=1e-4)

    def test_the_scale_sets_the_reconstruction_share(self, models, photo_batch) -> None:
        """The scale is the unit that makes a squared error commensurable with a nat of KL: a
        ten times smaller sigma gives the reconstruction a larger share of the gradient."""
        student = models[0]
        x = photo_batch[:4]
        loss = DistillLoss(distill_latent_weight=0, distill_recon_weight=0, perceptual_weight=0,
                           kl_free_bits=0.0)
        phase = Phase.__new__(Phase)  # term_shares needs only the loss and the batch's terms
        phase.criterion = loss
        phase.loss = lambda module, index, batch: loss(batch, module(batch), None, None)
        shares = []
        for sigma in (0.3, 0.03):
            with torch.no_grad():
                loss.scale.log_sigma.fill_(math.log(sigma))
            shares.append(phase.term_shares(student, torch.arange(4), x))
        (value_wide, grad_wide), (value_narrow, grad_narrow) = shares
        assert grad_narrow["recon"] > grad_wide["recon"] + 0.1
        assert value_narrow["recon"] != pytest.approx(value_wide["recon"], abs=1e-3)
        assert sum(grad_narrow.values()) == pytest.approx(1.0)

    def test_distill_terms_without_teacher_are_an_error(self, models, photo_batch) -> None:
        student, adapter, _ = models
        with pytest.raises(ValueError, match="no teacher"):
            DistillLoss(perceptual_weight=0)(photo_batch[:2], student(photo_batch[:2]), None,
                                             None)

    def test_negative_weight_rejected(self) -> None:
        with pytest.raises(ValueError, match="kl"):
            DistillLoss(kl_weight=-1)

    def test_teacher_loss_uses_same_kl(self, models, photo_batch) -> None:
        from hrm_vision.train.config import load_config

        _, _, teacher = models
        out = teacher(photo_batch[:4])
        config = load_config(None, {"kl_free_bits": 0.5, "free_bits_mode": "channel"})
        loss = DistillLoss.vae(config)
        assert loss.weights == {"recon": 0.3, "kl": 0.1, "distill_latent": 0.0,
                                "distill_recon": 0.0, "perceptual": 0.0}
        terms = loss(photo_batch[:4], out, None, None)
        per_element = 0.5 * 32 * 32 * math.log(2) / out.mu[0].numel()  # 0.5 bits per pixel
        assert torch.allclose(terms["kl"], kl_nats(out.mu, out.logvar, per_element, "channel"))


class TestRateBudget:
    @pytest.mark.parametrize("mode", ["total", "channel"])
    def test_the_floor_is_the_same_per_pixel_for_teacher_and_student(self, models, photo_batch,
                                                                     mode: str) -> None:
        """``kl_free_bits`` is bits per pixel of the image: a teacher with twice the student's
        latent gets the same floor in nats per image, not twice it."""
        student, _, teacher = models
        x = photo_batch[:4]
        loss = DistillLoss(distill_latent_weight=0, distill_recon_weight=0, perceptual_weight=0,
                           kl_free_bits=3.0, free_bits_mode=mode)
        floors = []
        for model in (student, teacher):
            out = model(x)
            quiet = out._replace(mu=torch.zeros_like(out.mu), logvar=torch.zeros_like(out.mu))
            floors.append(float(loss(x, quiet, None, None)["kl"]))  # a KL of 0: the floor
        assert teacher(x).mu[0].numel() == 2 * student(x).mu[0].numel()
        assert floors[0] == pytest.approx(floors[1]) == pytest.approx(3.0 * 32 * 32 * math.log(2))

    def test_a_budget_above_what_the_image_holds_is_refused(self) -> None:
        from hrm_vision.train.config import ConfigError, load_config

        assert load_config(None, {"kl_free_bits": 24.0}).kl_free_bits == 24.0
        for key in ("kl_free_bits", "kl_target"):
            with pytest.raises(ConfigError, match=key):
                load_config(None, {key: 24.5})


class TestTemperature:
    def test_temperature_changes_loss_and_gradient(self, photo_batch) -> None:
        torch.manual_seed(1)
        adapter = LatentAdapter(8, 16)
        mu_s = torch.randn(4, 8, 4, 4, requires_grad=True)
        logvar_s = torch.randn(4, 8, 4, 4).mul(0.5).requires_grad_(True)
        t = TeacherTargets(torch.randn(4, 16, 4, 4), torch.randn(4, 16, 4, 4).mul(0.5),
                           photo_batch[:4])
        results = []
        for temp in (1.0, 3.0):
            mu_s.grad = logvar_s.grad = adapter.proj.weight.grad = None
            loss = latent_distillation(*adapt(adapter, mu_s, logvar_s), t, temp)
            loss.backward()
            results.append((loss.item(), mu_s.grad.clone(), logvar_s.grad.clone(),
                            adapter.proj.weight.grad.clone()))
        (l1, gm1, gv1, gw1), (l3, gm3, gv3, gw3) = results
        assert l1 != pytest.approx(l3, rel=1e-3)
        assert not torch.allclose(gv1, gv3, rtol=1e-3)
        assert not torch.allclose(gw1, gw3, rtol=1e-3)
        # widening both posteriors by T divides the mean mismatch (the only path to mu_s) by T^2
        assert torch.allclose(gm1, 9 * gm3, rtol=1e-4, atol=1e-7)

    def test_zero_when_student_matches_teacher(self) -> None:
        adapter = LatentAdapter(4, 4)
        with torch.no_grad():
            adapter.proj.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
            adapter.proj.bias.zero_()
        mu, logvar = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2).clamp(-2, 2)
        t = TeacherTargets(mu, logvar, torch.zeros(2, 3, 16, 16))
        assert latent_distillation(*adapt(adapter, mu, logvar), t, 3.0).item() == pytest.approx(0,
                                                                                       abs=1e-5)


class TestPerceptual:
    def test_vgg16_from_local_weights_file(self, tmp_path, photo_batch) -> None:
        full = vgg16(weights=None).state_dict()
        small = {k: v for k, v in full.items()
                 if k.startswith("features.") and int(k.split(".")[1]) <= max(VGG_LAYERS)}
        path = tmp_path / "vgg16-local.pth"
        torch.save(small, path)
        backbone, name = build_perceptual("vgg16", vgg16_weights=str(path))
        assert name == "vgg16" and isinstance(backbone, VGG16Features)
        feats = backbone(photo_batch[:2])
        assert [f.shape[1] for f in feats] == [64, 128]
        assert torch.equal(backbone.features[0].weight, small["features.0.weight"])
        assert not any(p.requires_grad for p in backbone.parameters())

    def test_vgg16_weights_missing_layers(self, tmp_path) -> None:
        path = tmp_path / "partial.pth"
        torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
        with pytest.raises(ValueError, match="lack the layers"):
            build_perceptual("vgg16", vgg16_weights=str(path))

    def test_vgg16_without_weights_or_download_says_how(self, tmp_path, monkeypatch) -> None:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
        assert find_vgg16_weights() is None
        with pytest.raises(ValueError, match="--download"):
            build_perceptual("vgg16")

    def test_auto_falls_back_to_teacher_without_vgg(self, tmp_path, monkeypatch,
                                                    models) -> None:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
        backbone, name = build_perceptual("auto", teacher=models[2])
        assert name == "teacher" and isinstance(backbone, TeacherFeatures)

    def test_auto_prefers_cached_vgg(self, tmp_path, monkeypatch) -> None:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
        from hrm_vision.train.loss import hub_vgg16_path
        hub = hub_vgg16_path()
        hub.parent.mkdir(parents=True)
        torch.save({k: v for k, v in vgg16(weights=None).state_dict().items()
                    if k.startswith("features.") and int(k.split(".")[1]) <= 8}, hub)
        assert build_perceptual("auto")[1] == "vgg16"

    def test_imagenet_normalisation_applied(self, photo_batch) -> None:
        backbone = VGG16Features()
        x = photo_batch[:1]
        first = backbone.features[0]
        normed = (x - backbone.mean) / backbone.std
        assert torch.allclose(backbone(x)[0], backbone.features[:4](normed))
        assert not torch.allclose(first(x), first(normed))


class TestBoundedOutputDistillation:
    def test_only_pixels_where_the_teacher_is_closer_count(self) -> None:
        x = torch.zeros(1, 3, 2, 2)
        student = torch.full_like(x, 0.2)
        teacher = torch.full_like(x, 0.1)
        teacher[..., 0, 0] = 0.5  # the teacher is worse than the student on one pixel
        mask = teacher_closer(student, teacher, x)
        assert mask.sum() == 9 and mask[..., 0, 0].sum() == 0
        log_sigma = torch.tensor(0.5 * math.log(0.5))  # sigma^2 = 1/2: the NLL is err + const
        const = math.log(math.sqrt(0.5)) + 0.5 * math.log(2 * math.pi)
        plain = output_distillation_nll(student, teacher, log_sigma)
        bounded = output_distillation_nll(student, teacher, log_sigma, mask)
        assert float(plain) == pytest.approx(0.3 ** 2 * 3 + 0.1 ** 2 * 9 + 12 * const)
        assert float(bounded) == pytest.approx(0.1 ** 2 * 9 + 9 * const)

    def test_gradient_never_points_towards_a_worse_teacher(self) -> None:
        x = torch.zeros(1, 1, 1, 2)
        student = torch.tensor([[[[0.2, 0.2]]]], requires_grad=True)
        teacher = torch.tensor([[[[0.1, 0.6]]]])
        mask = teacher_closer(student, teacher, x)
        output_distillation_nll(student, teacher, torch.tensor(0.0), mask).backward()
        assert student.grad[0, 0, 0, 0] > 0  # pulled down towards the better teacher
        assert student.grad[0, 0, 0, 1] == 0  # not pulled up towards the worse one

    def test_config_switch_reaches_the_loss(self, tmp_path) -> None:
        from hrm_vision.train.config import load_config
        from hrm_vision.train.trainer import Distiller

        cfg = load_config(None, {"dataset": "photos", "checkpoint_dir": str(tmp_path),
                                 "distill_recon_bounded": True, "distill_latent_weight": 0.0,
                                 "distill_recon_weight": 0.0, "perceptual_weight": 0.0,
                                 "train_samples": 8, "val_samples": 4})
        assert Distiller(cfg).build_loss().bounded is True


class TestResidualVariance:
    def test_an_unpredicted_teacher_channel_no_longer_explodes_the_term(self) -> None:
        """Teacher channel 1 carries what the student does not: the adapter's conditional
        Gaussian widens by its residual, so the term stays of the order of its error."""
        from hrm_vision.train.loss import residual_variance

        adapter = LatentAdapter(1, 2)
        with torch.no_grad():
            adapter.proj.weight.copy_(torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))
            adapter.proj.bias.zero_()
        mu_s = torch.randn(8, 1, 2, 2)
        logvar_s = torch.full_like(mu_s, -4.0)
        mu_t = torch.cat([mu_s, torch.randn(8, 1, 2, 2)], 1)
        t = TeacherTargets(mu_t, torch.full_like(mu_t, -4.0), torch.zeros(8, 3, 16, 16))
        mu_a, var_a = adapt(adapter, mu_s, logvar_s)
        r = residual_variance(mu_a, var_a, t)
        assert r[0, 0].item() == pytest.approx(0.0, abs=1e-6)
        assert r[0, 1].item() == pytest.approx(mu_t[:, 1].pow(2).mean().item() + math.exp(-4),
                                               rel=1e-5)
        loss = latent_distillation(mu_a, var_a, t, 3.0)
        plain = latent_distillation_nats(mu_t, t.logvar.exp(), mu_a, var_a, 3.0)
        assert loss < plain / 20

    def test_a_teacher_channel_at_its_prior_costs_the_student_nothing(self) -> None:
        """A channel the teacher's rate budget leaves at the prior (mean 0, variance 1) and a
        student that predicts it exactly: without the teacher's own variance in the residual the
        student's variance there is 0 (floored at 1e-6) and the spread term about 500,000 nats
        per element."""
        adapter = LatentAdapter(1, 2)
        with torch.no_grad():
            adapter.proj.weight.copy_(torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))
            adapter.proj.bias.zero_()
        mu_s = torch.randn(8, 1, 2, 2)
        mu_a, var_a = adapt(adapter, mu_s, torch.full_like(mu_s, math.log(1e-4)))
        mu_t = torch.cat([mu_s, torch.zeros(8, 1, 2, 2)], 1)
        logvar_t = torch.cat([torch.full_like(mu_s, math.log(1e-4)), torch.zeros(8, 1, 2, 2)], 1)
        t = TeacherTargets(mu_t, logvar_t, torch.zeros(8, 3, 16, 16))
        assert latent_distillation(mu_a, var_a, t, 3.0).item() < 4 * 2.0  # < 2 nats per element


class TestRateTarget:
    def test_the_kl_weight_follows_the_rate(self, models, photo_batch) -> None:
        """With ``kl_target`` the KL has no floor, its weight is the multiplier, and a KL
        above the target raises the multiplier (below it, lowers it)."""
        student = models[0]
        x = photo_batch[:4]
        loss = DistillLoss(distill_latent_weight=0, distill_recon_weight=0, perceptual_weight=0,
                           kl_free_bits=50.0, kl_target=1.0)
        terms = loss(x, student(x), None, None)
        bpp = float(terms["bpp"])
        assert float(terms["kl"]) == pytest.approx(bpp * 32 * 32 * math.log(2))
        assert float(terms["kl"]) < 50.0 * 32 * 32 * math.log(2)  # no free-bits floor
        start = float(loss.rate.multiplier)
        assert float(loss.weighted(terms)["kl"]) == pytest.approx(start * float(terms["kl"]))
        loss.after_step(2.0)  # above the target
        assert float(loss.rate.multiplier) > start
        loss.after_step(0.1)
        loss.after_step(0.1)
        assert float(loss.rate.multiplier) < start

    def test_the_multiplier_travels_in_the_checkpoint_keys(self) -> None:
        loss = DistillLoss(perceptual_weight=0, kl_target=2.0)
        loss.after_step(4.0)
        payload = loss.scale_payload()
        other = DistillLoss(perceptual_weight=0, kl_target=2.0)
        assert float(other.rate.multiplier) != float(loss.rate.multiplier)
        other.load_scale(payload, "payload")
        assert float(other.rate.multiplier) == float(loss.rate.multiplier)
        assert "rate_multiplier" not in DistillLoss(perceptual_weight=0).scale_payload()
