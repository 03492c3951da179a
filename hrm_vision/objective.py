"""The distillation objective in one unit: nats per image.

Every term is a negative log-likelihood or a KL divergence summed over one image's numbers and
averaged over the batch, so the weights of a weighted sum are the ratios of comparable
quantities (``experiments/objective.py`` measures why this matters):

``gaussian_nll``
    Reconstruction: ``-log N(x | x_hat, sigma^2)`` summed over pixels and colours, with a
    calibrated scale ``sigma`` (:class:`GaussianScale`: one learned ``log sigma`` for the model,
    or one per colour channel, as in the sigma-VAE of Rybkin et al., 2021). With a fixed
    ``sigma`` it is ``MSE * numbers / (2 sigma^2)`` plus a constant, so the scale decides how
    much a squared error weighs against a nat of KL.
``kl_nats``
    Rate: ``KL(q(z|x) || N(0, I))`` summed over latent elements, with a floor (free bits) either
    per latent channel or on the total (:func:`kl_nats`).
``latent_distillation_nats``
    ``KL(N(mu_t, T^2 var_t) || N(mu_s, T^2 var_s))`` between the teacher posterior and the
    student posterior mapped to the teacher's space, summed over the teacher's latent elements:
    both posteriors widened by the temperature ``T``, so ``T`` discounts a mismatch of the means
    by ``1 / T^2`` against a mismatch of the spreads; ``T = 1`` is the plain KL.
``output_distillation_nll``
    ``-log N(teacher_output | student_output, sigma^2)`` with the reconstruction's scale, so one
    squared error against the teacher weighs what the same error against the image weighs.

Images are float ``(B, 3, H, W)`` in [0, 1]; latents ``(B, C, h, w)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

_LOG_2PI = math.log(2 * math.pi)
#: Variances in the latent distillation KL are floored here so the ratio stays finite.
VAR_FLOOR = 1e-6


def gaussian_nll(prediction: Tensor, target: Tensor, log_sigma: Tensor,
                 mask: Tensor | None = None) -> Tensor:
    """``-log N(target | prediction, exp(log_sigma)^2)`` in nats per image (batch mean).

    ``prediction, target``: ``(B, C, H, W)``; ``log_sigma``: a scalar or ``(C,)`` (one scale per
    channel). ``mask`` (same shape as ``target``, 0 or 1, no gradient) keeps only some numbers
    (the others contribute nothing). Returns a scalar tensor.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    ls = log_sigma.float()
    if ls.dim() == 1:
        if ls.numel() != target.shape[1]:
            raise ValueError(f"log_sigma has {ls.numel()} scales for {target.shape[1]} channels")
        ls = ls.view(1, -1, 1, 1)
    elif ls.dim() != 0:
        raise ValueError(f"log_sigma must be a scalar or (C,), got {tuple(ls.shape)}")
    err = (prediction.float() - target.float()).pow(2)
    nll = 0.5 * err * torch.exp(-2 * ls) + ls + 0.5 * _LOG_2PI
    if mask is not None:
        nll = nll * mask.detach().to(nll.dtype)
    return nll.flatten(1).sum(1).mean()


class GaussianScale(nn.Module):
    """A learned likelihood scale: ``log_sigma`` of one scalar (``channels=None``) or one per
    colour channel. ``sigma`` should start near the model's root mean squared error
    (:meth:`calibrate`): a scale far too wide makes the reconstruction weigh nothing at first,
    and Adam moves ``log sigma`` by about the learning rate per step.
    """

    def __init__(self, sigma: float = 0.1, channels: int | None = None) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        shape = () if channels is None else (channels,)
        self.log_sigma = nn.Parameter(torch.full(shape, math.log(sigma)))

    @torch.no_grad()
    def calibrate(self, prediction: Tensor, target: Tensor) -> None:
        """Set ``sigma`` to the root mean squared error of ``prediction`` (per channel when the
        scale has channels): the maximum-likelihood scale for these images."""
        err = (prediction.float() - target.float()).pow(2)
        mse = err.mean() if self.log_sigma.dim() == 0 else err.mean(dim=(0, 2, 3))
        self.log_sigma.copy_(0.5 * mse.clamp(min=1e-12).log())

    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp()

    def forward(self, prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """:func:`gaussian_nll` with this scale."""
        return gaussian_nll(prediction, target, self.log_sigma, mask)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Element-wise ``KL(N(mu, exp(logvar)) || N(0, 1))`` in nats, same shape as ``mu``."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


#: Where :func:`kl_nats` applies its free-bits floor.
FREE_BITS_MODES = ("channel", "total")


def kl_nats(mu: Tensor, logvar: Tensor, free_bits: float = 0.0,
            mode: str = "total") -> Tensor:
    """KL of the posterior ``(B, C, h, w)`` (or a vector latent ``(B, C)``) to N(0, I) in nats
    per image, with a floor.

    ``free_bits`` is in nats per latent element. ``mode="channel"``: each channel's batch-mean KL
    is raised to at least ``free_bits * h * w`` (a rate floor per channel: every channel is
    asked for the same rate); ``mode="total"``: the image's batch-mean KL is raised to at least
    ``free_bits * C * h * w`` (one floor for the whole latent: the model spends the same total
    where it helps most). A floor that binds gives no gradient.
    """
    if free_bits < 0:
        raise ValueError(f"free_bits must be >= 0, got {free_bits}")
    if mode not in FREE_BITS_MODES:
        raise ValueError(f"mode must be one of {FREE_BITS_MODES}, got {mode!r}")
    kl = gaussian_kl(mu, logvar)
    if mode == "channel":  # (C,) nats per image; a vector latent's numbers are channels
        per_channel = kl.reshape(kl.shape[0], kl.shape[1], -1).sum(2).mean(0)
        return per_channel.clamp(min=free_bits * kl[0, 0].numel()).sum()
    return kl.flatten(1).sum(1).mean().clamp(min=free_bits * kl[0].numel())


def kl_per_element(mu: Tensor, logvar: Tensor) -> float:
    """Mean KL in nats per latent element (no floor): the rate a model spends."""
    return float(gaussian_kl(mu, logvar).mean())


class RateTarget(nn.Module):
    """A Lagrange multiplier holding the KL at ``target`` nats per latent element.

    The loss uses ``multiplier * kl`` (nats per image); after each optimiser step
    :meth:`update` raises the multiplier when the KL is above the target and lowers it when
    below (``log m += step_size * (kl / target - 1)``, multiplicative dual ascent). The
    multiplier is a buffer, saved with the model's state.
    """

    multiplier: Tensor

    def __init__(self, target: float, initial: float = 1.0, step_size: float = 0.01) -> None:
        super().__init__()
        if not target > 0 or not initial > 0 or not step_size > 0:
            raise ValueError("target, initial and step_size must be > 0, got "
                             f"{target}, {initial}, {step_size}")
        self.target, self.step_size = target, step_size
        self.register_buffer("multiplier", torch.tensor(float(initial)))

    @torch.no_grad()
    def update(self, nats_per_element: float) -> float:
        """One dual step from the KL just measured; returns the new multiplier."""
        self.multiplier.mul_(math.exp(self.step_size * (nats_per_element / self.target - 1)))
        return float(self.multiplier)


def latent_distillation_nats(teacher_mu: Tensor, teacher_var: Tensor, student_mu: Tensor,
                             student_var: Tensor, temperature: float) -> Tensor:
    """``KL(N(mu_t, T^2 var_t) || N(mu_s, T^2 var_s))`` in nats per image (batch mean).

    All four tensors ``(B, C_t, h, w)``: the teacher posterior and the student posterior mapped
    to the teacher's latent (mean and marginal variance). Per element::

        0.5 ln(var_s / var_t) + var_t / (2 var_s) - 0.5 + (mu_t - mu_s)^2 / (2 T^2 var_s)

    ``temperature`` (> 0) widens both distributions, which leaves the spread term unchanged and
    divides the mean term by ``T^2``. Variances are floored at ``VAR_FLOOR``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    var_t = teacher_var.float().clamp(min=VAR_FLOOR)
    var_s = student_var.float().clamp(min=VAR_FLOOR)
    spread = 0.5 * (var_s.log() - var_t.log()) + var_t / (2 * var_s) - 0.5
    mean = (teacher_mu.float() - student_mu.float()).pow(2) / (2 * temperature ** 2 * var_s)
    return (spread + mean).flatten(1).sum(1).mean()


def output_distillation_nll(student_output: Tensor, teacher_output: Tensor, log_sigma: Tensor,
                            mask: Tensor | None = None) -> Tensor:
    """``-log N(teacher_output | student_output, sigma^2)`` in nats per image, with the
    reconstruction's scale ``log_sigma`` detached (the teacher term does not set the scale).

    ``student_output, teacher_output``: ``(B, 3, H, W)`` in [0, 1]; ``mask`` as in
    :func:`gaussian_nll` (e.g. only the pixels where the teacher is closer to the image).
    """
    return gaussian_nll(student_output, teacher_output.detach(), log_sigma.detach(), mask)


def value_shares(weighted: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Each weighted term's share ``|w_i L_i| / sum_j |w_j L_j|`` of the objective, in [0, 1].

    Absolute values, because a Gaussian NLL with a small scale is negative.
    """
    vals = {k: abs(float(v.detach() if isinstance(v, Tensor) else v))
            for k, v in weighted.items()}
    total = sum(vals.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in vals.items()}


def gradient_shares(weighted: Mapping[str, Tensor], parameters: Sequence[Tensor]
                    ) -> dict[str, float]:
    """Each weighted term's share ``||g_i|| / sum_j ||g_j||`` of the gradient norm over
    ``parameters`` (``g_i`` the gradient of term i alone; one backward pass per term, the graph
    is kept). A term that does not reach the parameters has share 0.
    """
    params = [p for p in parameters if p.requires_grad]
    norms = {}
    for name, term in weighted.items():
        if not isinstance(term, Tensor) or not term.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        norms[name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads
                                    if g is not None))
    total = sum(norms.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in norms.items()}
