"""The five terms of the distillation objective, each in nats per image.

Images are float tensors in [0, 1], ``(B, 3, H, W)``; latents ``(B, C, H/8, W/8)``, or
``(B, C)`` for the compact models' vector latents. Every term is summed over one image's numbers
and averaged over the batch (the units and the maths are in :mod:`hrm_vision.objective`), so the
weights (0.3 / 0.1 / 0.3 / 0.2 / 0.1 by default) are the ratios of comparable quantities:

``recon``
    ``-log N(x | x_hat, sigma^2)``: a Gaussian negative log-likelihood of the image with one
    learned scale ``sigma`` (:class:`~hrm_vision.objective.GaussianScale`, as in the sigma-VAE of
    Rybkin et al., 2021), which starts at the error of the training reconstruction
    (:meth:`DistillLoss.calibrate`). The scale decides how much a squared error weighs against a
    nat of KL; a fixed one either drowns the KL or is drowned by it (``experiments/objective.py``
    measures the package's earlier MSE objective at 0.07% reconstruction).
``kl``
    ``KL(q(z|x) || N(0, I))`` with a free-bits floor of ``kl_free_bits`` nats per latent element,
    on the total KL (default: the model spends the rate where it helps most) or on each channel.
``distill_latent``
    ``KL(N(mu_t, T^2 var_t) || N(A mu_s, T^2 (A var_s A^T + r)))``: the teacher posterior against
    the student posterior pushed through the linear adapter ``A``, plus the residual variance
    ``r`` that the adapter leaves unexplained (:func:`residual_variance`). Without ``r`` the
    teacher's posterior, far wider than the student's on the channels the student does not
    carry, made the term three orders of magnitude larger than the others and pushed the
    student's posterior noise up (``docs/training.md``). The temperature ``T`` widens both
    posteriors: the mismatch of the means counts ``1 / T^2`` as much as the mismatch of spreads.
``distill_recon``
    ``-log N(teacher_output | student_output, sigma^2)`` with the reconstruction's scale
    (detached): an error against the teacher weighs what the same error against the image
    weighs. With ``bounded=True`` (teacher-bounded, after Chen et al., 2017) a pixel counts only
    where the teacher is closer to the input than the student (the mask carries no gradient).
``perceptual``
    Feature matching through a frozen backbone (:mod:`hrm_vision.distill.perceptual`): per layer
    the squared error divided by the mean square of the target features (scale-free), averaged
    over layers, times half the image's number of values: the negative log-likelihood of a
    unit-variance Gaussian on the normalised features at the image's size, constants dropped.
    It is the one term whose scale is fixed, not calibrated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import CheckpointError
from ..objective import (
    FREE_BITS_MODES,
    GaussianScale,
    RateTarget,
    kl_nats,
    latent_distillation_nats,
    output_distillation_nll,
)
from ..vae import LatentAdapter, VAEBase, VAEOutput
from .config import DistillConfig

#: Names of the five terms, in the order they are logged.
TERMS: tuple[str, ...] = ("recon", "kl", "distill_latent", "distill_recon", "perceptual")
#: Seed of the posterior samples the scale is calibrated on (a generator of its own: the
#: training run's random stream is not touched).
CALIBRATION_SEED = 0
#: Checkpoint keys of the likelihood scale ``log sigma`` and of the rate multiplier.
SCALE_KEY, RATE_KEY = "likelihood_log_sigma", "rate_multiplier"
#: Dual step of the rate multiplier: ``log m`` moves by 0.5 x the KL's relative excess per
#: step. The likelihood's weight grows as its scale shrinks, so the multiplier has to follow:
#: at 0.01 or 0.1 the training KL drifted 8-12% above the target over 3 demo epochs; at 0.5
#: it is back at the target in the third (``docs/results.md``).
RATE_STEP = 0.5


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
    """The ``distill_latent`` term in nats per image: the teacher posterior against the
    adapter's conditional Gaussian ``N(A mu_s, A var_s A^T + r)`` with ``r`` the
    :func:`residual_variance` (see :func:`adapt` and
    :func:`hrm_vision.objective.latent_distillation_nats`)."""
    var = adapted_var + residual_variance(adapted_mu, teacher)
    return latent_distillation_nats(teacher.mu, teacher.logvar.float().exp(), adapted_mu, var,
                                    temperature)


def feature_matching(features_pred: list[Tensor], features_target: list[Tensor]) -> Tensor:
    """Mean over layers of ``mse(pred, target) / mean(target**2)`` (scale-free per layer)."""
    if len(features_pred) != len(features_target) or not features_pred:
        raise ValueError("feature_matching needs the same non-zero number of feature maps")
    terms = [F.mse_loss(p.float(), t.float()) / (t.float().pow(2).mean() + 1e-8)
             for p, t in zip(features_pred, features_target, strict=True)]
    return torch.stack(terms).mean()


def teacher_closer(student: Tensor, teacher: Tensor, x: Tensor) -> Tensor:
    """The teacher-bounded mask: 1 where the teacher reconstruction is closer to the input ``x``
    than the student's, else 0 (all ``(B, 3, H, W)``; no gradient)."""
    with torch.no_grad():
        return ((teacher - x).pow(2) < (student - x).pow(2)).float()


class Trainable(nn.Module):
    """What a phase trains, in one module (one DDP wrapper, one weight average): the model, the
    likelihood scale of its loss and, when distilling, the latent adapter.
    ``x -> (VAEOutput, (adapted_mu, adapted_var) or None)``."""

    def __init__(self, model: VAEBase, scale: nn.Module,
                 adapter: LatentAdapter | None = None) -> None:
        super().__init__()
        self.model, self.scale, self.adapter = model, scale, adapter

    def forward(self, x: Tensor) -> tuple[VAEOutput, tuple[Tensor, Tensor] | None]:
        out = self.model(x)
        if self.adapter is None:
            return out, None
        return out, adapt(self.adapter, out.mu, out.logvar)


class DistillLoss(nn.Module):
    """The weighted five-term objective in nats per image; ``forward`` returns every term
    (unweighted) and ``"total"`` (the weighted sum).

    Args:
        recon_weight, kl_weight, distill_latent_weight, distill_recon_weight, perceptual_weight:
            term weights (>= 0).
        kl_free_bits: KL floor in nats per latent element; ``free_bits_mode``: ``"total"`` (one
            floor on the whole latent's KL) or ``"channel"`` (one per latent channel).
        kl_target: hold the KL at this many nats per latent element instead: the KL term (no
            floor) is weighted by a Lagrange multiplier (:class:`~hrm_vision.objective.RateTarget`,
            starting at ``kl_weight``) that :meth:`after_step` moves after each optimizer step.
        temperature: latent distillation temperature (> 0).
        bounded: teacher-bounded output distillation (see ``distill_recon`` above).
        perceptual: a frozen backbone mapping images in [0, 1] to a list of feature maps, or
            ``None`` (then ``perceptual_weight`` must be 0).

    The learned likelihood scale is the submodule ``scale``: the phases train it with the model
    and save it in the checkpoints.
    """

    def __init__(self, *, recon_weight: float = 0.3, kl_weight: float = 0.1,
                 distill_latent_weight: float = 0.3, distill_recon_weight: float = 0.2,
                 perceptual_weight: float = 0.1, kl_free_bits: float = 2.0,
                 free_bits_mode: str = "total", kl_target: float | None = None,
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
        if kl_free_bits < 0:
            raise ValueError(f"kl_free_bits must be >= 0, got {kl_free_bits}")
        if free_bits_mode not in FREE_BITS_MODES:
            raise ValueError(f"free_bits_mode must be one of {FREE_BITS_MODES}, got "
                             f"{free_bits_mode!r}")
        self.weights = weights
        self.kl_free_bits, self.free_bits_mode = kl_free_bits, free_bits_mode
        self.temperature = temperature
        self.bounded = bounded
        self.perceptual = perceptual
        self.scale = GaussianScale()
        self.rate = (RateTarget(kl_target, initial=max(kl_weight, 1e-3), step_size=RATE_STEP)
                     if kl_target is not None else None)

    @classmethod
    def from_config(cls, config: DistillConfig, perceptual: nn.Module | None = None,
                    distill: bool = True) -> DistillLoss:
        """The loss of a run's config (``distill=False``: the two distillation weights 0)."""
        c = config
        return cls(recon_weight=c.recon_weight, kl_weight=c.kl_weight,
                   distill_latent_weight=c.distill_latent_weight if distill else 0.0,
                   distill_recon_weight=c.distill_recon_weight if distill else 0.0,
                   perceptual_weight=c.perceptual_weight, kl_free_bits=c.kl_free_bits,
                   free_bits_mode=c.free_bits_mode, kl_target=c.kl_target,
                   temperature=c.temperature, perceptual=perceptual,
                   bounded=c.distill_recon_bounded)

    @classmethod
    def vae(cls, config: DistillConfig) -> DistillLoss:
        """The teacher's pre-training objective: ``recon`` and ``kl`` as for the student."""
        return cls(recon_weight=config.recon_weight, kl_weight=config.kl_weight,
                   distill_latent_weight=0.0, distill_recon_weight=0.0, perceptual_weight=0.0,
                   kl_free_bits=config.kl_free_bits, free_bits_mode=config.free_bits_mode,
                   kl_target=config.kl_target)

    @property
    def needs_teacher(self) -> bool:
        """Whether a term with a non-zero weight needs the teacher's outputs."""
        return self.weights["distill_latent"] > 0 or self.weights["distill_recon"] > 0

    def calibrate(self, model: VAEBase, x: Tensor) -> float:
        """Set the scale to the root mean squared error of ``model``'s training reconstruction
        (a seeded posterior sample, :meth:`VAEBase.decode_sample`) of images ``x`` in [0, 1]:
        the maximum-likelihood scale at the start. Returns ``sigma``."""
        self.scale.calibrate(model.decode_sample(x, CALIBRATION_SEED), x)
        return float(self.scale.sigma.detach())

    def after_step(self, kl_per_element: float) -> None:
        """After an optimizer step: move the rate multiplier (with a ``kl_target``) from the KL
        per latent element just measured (averaged over the processes)."""
        if self.rate is not None:
            self.rate.update(kl_per_element)

    def _state(self) -> dict[str, Tensor]:
        state = {SCALE_KEY: self.scale.log_sigma}
        if self.rate is not None:
            state[RATE_KEY] = self.rate.multiplier
        return state

    def scale_payload(self) -> dict[str, Any]:
        """The checkpoint keys of this loss's learned state: the likelihood scale and, with a
        ``kl_target``, the rate multiplier."""
        return {k: v.detach().cpu().clone() for k, v in self._state().items()}

    def load_scale(self, payload: dict[str, Any], source: str) -> None:
        """Load what :meth:`scale_payload` wrote (an absent key keeps the value it has)."""
        for key, target in self._state().items():
            if key not in payload:
                continue
            value = payload[key]
            if not (isinstance(value, Tensor) and value.shape == target.shape
                    and value.is_floating_point() and bool(torch.isfinite(value).all())):
                raise CheckpointError(f"{source}: {key} must be a finite float tensor of "
                                      f"shape {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value)

    def weighted(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{term: weight * value}`` for the terms with a non-zero weight (the KL's weight is
        the rate multiplier with a ``kl_target``)."""
        weights = dict(self.weights)
        if self.rate is not None:
            weights["kl"] = self.rate.multiplier
        return {k: weights[k] * terms[k] for k in TERMS if float(weights[k]) > 0}

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
        recon, target = student.reconstruction.float(), x.float()
        log_sigma = self.scale.log_sigma
        terms = {
            "recon": self.scale(recon, target),
            "kl": kl_nats(student.mu, student.logvar,
                          self.kl_free_bits if self.rate is None else 0.0, self.free_bits_mode),
            "distill_latent": zero, "distill_recon": zero, "perceptual": zero,
        }
        if teacher is not None:
            if adapted is None:
                raise ValueError("teacher outputs need the adapted student posterior")
            terms["distill_latent"] = latent_distillation(*adapted, teacher, self.temperature)
            teacher_rec = teacher.reconstruction.float()
            mask = teacher_closer(recon, teacher_rec, target) if self.bounded else None
            terms["distill_recon"] = output_distillation_nll(recon, teacher_rec, log_sigma, mask)
        if self.perceptual is not None and self.weights["perceptual"] > 0:
            with torch.no_grad():
                features = self.perceptual(x)
            terms["perceptual"] = 0.5 * x[0].numel() * feature_matching(
                self.perceptual(student.reconstruction), features)
        terms["total"] = sum(self.weighted(terms).values(), zero)
        if self.rate is not None:  # what the multiplier follows
            terms["kl_per_element"] = terms["kl"].detach() / student.mu[0].numel()
        return terms
