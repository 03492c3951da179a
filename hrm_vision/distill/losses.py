"""The five loss terms of the distillation objective and the teacher's own VAE loss.

All images are float tensors in [0, 1], (B, 3, H, W); latents are (B, C, H/8, W/8).

Terms (each logged separately; the total is their weighted sum):

``recon``
    Per-pixel MSE between the student reconstruction and the input.
``kl``
    KL of the student posterior to N(0, I) in **nats per latent element with free bits**
    (Kingma et al., 2016): the per-element KL is averaged over batch and positions for each
    latent channel, each channel's average is raised to at least ``free_bits`` nats
    (``max(KL_c, free_bits)``), and the channels are averaged. A channel that spends less than its
    budget gets no gradient, so the KL weight only restrains channels that spend more. Without the
    budget, any per-element normalisation next to a per-pixel MSE makes the default weights
    (recon 0.3, KL 0.1) a beta-VAE with an effective decoder standard deviation near 0.4-0.5,
    whose posterior collapses. The teacher's pre-training uses the same definition.
``distill_latent``
    Temperature-softened Gaussian KL (Hinton et al. 2015, for Gaussians): the student posterior
    is pushed through the linear adapter (mean ``A(mu_s)``, marginal variance
    ``diag(W diag(var_s) W^T)``) plus the residual variance ``r`` the adapter leaves
    unexplained (:func:`residual_variance`: without it the teacher's posterior variance, far
    wider than the student's on the channels the student does not carry, made the term three
    orders of magnitude larger than the others and pushed the student's posterior noise up;
    ``docs/training.md`` has the measurement). Both it and the teacher posterior get their
    standard deviations multiplied by ``T``, and ``T**2 * KL(teacher_T || student_T)`` is
    averaged over elements (``var_s`` below includes ``r``)::

        T**2 * (0.5 log(var_s/var_t) + var_t / (2 var_s) - 0.5) + (mu_t - A mu_s)**2 / (2 var_s)

    so ``T`` sets how much matching the teacher's uncertainty weighs against matching its mean
    (``T = 1`` is the plain KL). Variances are floored at ``VAR_FLOOR``.
``distill_recon``
    MSE between the student and the (frozen, eval-mode) teacher reconstructions. With
    ``bounded=True`` (teacher-bounded, after the bounded regression loss of Chen et al., 2017)
    a pixel counts only where the teacher is closer to the input than the student is (the mask
    carries no gradient), so the term never pulls the student towards a teacher error; the
    mean is still over all pixels.
``perceptual``
    Feature matching between the student reconstruction and the input through a frozen backbone
    (:mod:`hrm_vision.distill.perceptual`): per layer the squared error divided by the mean square
    of the target features (scale-free, so no layer or backbone dominates by its units), averaged
    over layers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..vae import LatentAdapter, VAEOutput
from .config import DistillConfig

#: Names of the five terms, in the order they are logged.
TERMS: tuple[str, ...] = ("recon", "kl", "distill_latent", "distill_recon", "perceptual")
#: Variances in the latent distillation KL are floored here (std >= 0.01) so the ratio stays finite.
VAR_FLOOR = 1e-4


class TeacherTargets(NamedTuple):
    """What the frozen teacher says about a batch (from the model or the teacher cache).

    mu, logvar: ``(B, teacher_dim, H/8, W/8)``; reconstruction: ``(B, 3, H, W)`` in [0, 1].
    """

    mu: Tensor
    logvar: Tensor
    reconstruction: Tensor


@torch.no_grad()
def teacher_targets(teacher: nn.Module, x: Tensor) -> TeacherTargets:
    """The frozen ``teacher``'s outputs for images ``x`` (B, 3, H, W) in [0, 1], in float32.

    Put the teacher in eval mode first (then its latent is the posterior mean, not a sample).
    """
    out = teacher(x)
    return TeacherTargets(out.mu.float(), out.logvar.float(), out.reconstruction.float())


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Element-wise ``KL(N(mu, exp(logvar)) || N(0, 1))`` in nats, same shape as ``mu``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_free_bits(mu: Tensor, logvar: Tensor, free_bits: float) -> Tensor:
    """Scalar KL in nats per latent element with a ``free_bits`` budget per channel.

    ``mu, logvar``: ``(B, C, h, w)``, or ``(B, C)`` for a vector latent (each number its own
    channel). Returns ``mean_c max(mean_{b,y,x} KL, free_bits)``.
    """
    if free_bits < 0:
        raise ValueError(f"free_bits must be >= 0, got {free_bits}")
    per_channel = gaussian_kl(mu.float(), logvar.float()).mean(dim=(0, *range(2, mu.dim())))
    return per_channel.clamp(min=free_bits).mean()


def softened_gaussian_kl(mu_t: Tensor, var_t: Tensor, mu_s: Tensor, var_s: Tensor,
                         temperature: float) -> Tensor:
    """``T**2 * KL(N(mu_t, T**2 var_t) || N(mu_s, T**2 var_s))``, averaged over elements.

    All tensors have the same shape. ``temperature`` > 0 (checked where it enters: the config
    and :class:`DistillLoss`).
    """
    var_t = var_t.float().clamp(min=VAR_FLOOR)
    var_s = var_s.float().clamp(min=VAR_FLOOR)
    t2 = temperature ** 2
    spread = 0.5 * (torch.log(var_s) - torch.log(var_t)) + var_t / (2 * var_s) - 0.5
    mean = (mu_t.float() - mu_s.float()).pow(2) / (2 * var_s)
    return (t2 * spread + mean).mean()


def adapt(adapter: LatentAdapter, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """The student posterior pushed through the linear ``adapter``: (mean, marginal variance),
    both ``(B, teacher_dim, h, w)``."""
    return adapter(mu), adapter.variance(logvar.float().exp())


def residual_variance(adapted_mu: Tensor, teacher: TeacherTargets) -> Tensor:
    """Per teacher channel, the variance of the teacher's mean that the adapter does not
    explain: the mean over batch and positions of ``(mu_t - A mu_s)**2``, shape
    ``(1, teacher_dim, 1, 1)`` (``(1, teacher_dim)`` for vector latents), detached.

    It is the maximum-likelihood variance of a Gaussian ``p(mu_t | z_s)`` around the adapter's
    mean, so the latent term compares the teacher posterior with an honest conditional Gaussian
    instead of with the student's (much narrower) posterior pushed through the adapter. It is 0
    when the adapter predicts the teacher's mean exactly.
    """
    with torch.no_grad():
        err = (teacher.mu.float() - adapted_mu.float()).pow(2)
        return err.mean(dim=(0, *range(2, err.dim())), keepdim=True)


def latent_distillation(adapted_mu: Tensor, adapted_var: Tensor, teacher: TeacherTargets,
                        temperature: float) -> Tensor:
    """The ``distill_latent`` term: the teacher posterior vs the adapter's conditional Gaussian
    ``N(A mu_s, A var_s A^T + r)`` with ``r`` the :func:`residual_variance` (see :func:`adapt`,
    :func:`softened_gaussian_kl`)."""
    var = adapted_var + residual_variance(adapted_mu, teacher)
    return softened_gaussian_kl(teacher.mu, teacher.logvar.float().exp(), adapted_mu, var,
                                temperature)


def feature_matching(features_pred: list[Tensor], features_target: list[Tensor]) -> Tensor:
    """Mean over layers of ``mse(pred, target) / mean(target**2)`` (scale-free per layer)."""
    if len(features_pred) != len(features_target) or not features_pred:
        raise ValueError("feature_matching needs the same non-zero number of feature maps")
    terms = [F.mse_loss(p.float(), t.float()) / (t.float().pow(2).mean() + 1e-8)
             for p, t in zip(features_pred, features_target, strict=True)]
    return torch.stack(terms).mean()


def output_distillation(student: Tensor, teacher: Tensor, x: Tensor, bounded: bool) -> Tensor:
    """The ``distill_recon`` term: MSE between student and teacher reconstructions (B, 3, H, W),
    or with ``bounded`` only over the pixels where the teacher is closer to the input ``x``."""
    diff = (student - teacher).pow(2)
    if bounded:
        with torch.no_grad():
            mask = ((teacher - x).pow(2) < (student - x).pow(2)).to(diff.dtype)
        diff = diff * mask
    return diff.mean()


class DistillLoss(nn.Module):
    """The weighted five-term objective; ``forward`` returns every term and ``"total"``.

    Args:
        recon_weight, kl_weight, distill_latent_weight, distill_recon_weight, perceptual_weight:
            term weights (>= 0).
        kl_free_bits: KL budget in nats per latent element (per channel).
        temperature: latent distillation temperature (> 0).
        bounded: teacher-bounded output distillation (see ``distill_recon`` above).
        perceptual: a frozen backbone mapping images in [0, 1] to a list of feature maps, or
            ``None`` (then ``perceptual_weight`` must be 0).
    """

    def __init__(self, *, recon_weight: float = 0.3, kl_weight: float = 0.1,
                 distill_latent_weight: float = 0.3, distill_recon_weight: float = 0.2,
                 perceptual_weight: float = 0.1, kl_free_bits: float = 2.0,
                 temperature: float = 3.0, perceptual: nn.Module | None = None,
                 bounded: bool = False) -> None:
        super().__init__()
        weights = {"recon": recon_weight, "kl": kl_weight, "distill_latent": distill_latent_weight,
                   "distill_recon": distill_recon_weight, "perceptual": perceptual_weight}
        bad = {k: v for k, v in weights.items() if v < 0}
        if bad:
            raise ValueError(f"loss weights must be >= 0, got {bad}")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual backbone")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.weights = weights
        self.kl_free_bits = kl_free_bits
        self.temperature = temperature
        self.bounded = bounded
        self.perceptual = perceptual

    @classmethod
    def from_config(cls, config: DistillConfig, perceptual: nn.Module | None = None,
                    distill: bool = True) -> DistillLoss:
        """The loss of a run's config (``distill=False``: the two distillation weights 0)."""
        c = config
        return cls(recon_weight=c.recon_weight, kl_weight=c.kl_weight,
                   distill_latent_weight=c.distill_latent_weight if distill else 0.0,
                   distill_recon_weight=c.distill_recon_weight if distill else 0.0,
                   perceptual_weight=c.perceptual_weight, kl_free_bits=c.kl_free_bits,
                   temperature=c.temperature, perceptual=perceptual,
                   bounded=c.distill_recon_bounded)

    @property
    def needs_teacher(self) -> bool:
        """Whether a term with a non-zero weight needs the teacher's outputs."""
        return self.weights["distill_latent"] > 0 or self.weights["distill_recon"] > 0

    def forward(self, x: Tensor, student: VAEOutput, adapted: tuple[Tensor, Tensor] | None,
                teacher: TeacherTargets | None) -> dict[str, Tensor]:
        """Terms for images ``x`` (B, 3, H, W) in [0, 1] and the student's forward output.

        ``adapted`` is ``adapt(adapter, student.mu, student.logvar)`` (needed with a teacher).

        A term whose weight is 0 and that cannot be computed (no teacher, no backbone) is 0.
        Returns ``{term: scalar tensor}`` for the five terms plus ``"total"``.
        """
        if teacher is None and self.needs_teacher:
            raise ValueError("the distillation terms have non-zero weights but no teacher "
                             "outputs were given")
        zero = x.new_zeros((), dtype=torch.float32)
        recon = student.reconstruction.float()
        terms = {
            "recon": F.mse_loss(recon, x.float()),
            "kl": kl_free_bits(student.mu, student.logvar, self.kl_free_bits),
            "distill_latent": zero, "distill_recon": zero, "perceptual": zero,
        }
        if teacher is not None:
            if adapted is None:
                raise ValueError("teacher outputs need the adapted student posterior")
            terms["distill_latent"] = latent_distillation(*adapted, teacher, self.temperature)
            terms["distill_recon"] = output_distillation(recon, teacher.reconstruction.float(),
                                                         x.float(), self.bounded)
        if self.perceptual is not None and self.weights["perceptual"] > 0:
            with torch.no_grad():
                target = self.perceptual(x)
            terms["perceptual"] = feature_matching(self.perceptual(student.reconstruction),
                                                   target)
        terms["total"] = sum((self.weights[k] * terms[k] for k in TERMS), zero)
        return terms


def vae_loss(x: Tensor, out: VAEOutput, recon_weight: float, kl_weight: float,
             free_bits: float) -> dict[str, Tensor]:
    """The teacher's pre-training objective: ``recon`` and ``kl`` defined as for the student."""
    terms = {"recon": F.mse_loss(out.reconstruction.float(), x.float()),
             "kl": kl_free_bits(out.mu, out.logvar, free_bits)}
    terms["total"] = recon_weight * terms["recon"] + kl_weight * terms["kl"]
    return terms
