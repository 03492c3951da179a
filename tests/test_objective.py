"""The objective's terms in nats per image: units, floors, temperature and shares."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from hrm_vision.train import loss as obj


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

    def test_calibrate_sets_the_rms_error(self) -> None:
        x, rec = _images()
        scale = obj.GaussianScale()
        scale.calibrate(rec, x)
        assert float(scale.sigma.detach()) == pytest.approx(float((rec - x).pow(2).mean().sqrt()),
                                                   rel=1e-5)
        # the calibrated scale is where the NLL is lowest
        base = float(scale(rec, x))
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
        assert float(total) == pytest.approx(4.5) and float(channel) == pytest.approx(5.5)
        (grad_total,) = torch.autograd.grad(total, mu)
        assert float(grad_total[:, 0].abs().sum()) > 0

    def test_binding_floor_gives_no_gradient(self) -> None:
        mu = torch.full((2, 3, 2, 2), 0.1, requires_grad=True)
        kl = obj.kl_nats(mu, torch.zeros(2, 3, 2, 2), 2.0, "total")
        assert float(kl) == pytest.approx(2.0 * 12)
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
