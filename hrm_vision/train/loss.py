"""The whole distillation objective, every term in nats per image.

Every term is a negative log-likelihood or a KL divergence summed over one image's numbers and
averaged over the batch, so the weights are ratios of comparable quantities. Images are float
``(B, 3, H, W)`` in [0, 1]; latents ``(B, C, H/8, W/8)``, or ``(B, C)`` for the compact models.

- ``recon``: ``-log N(x | x_hat, sigma^2)`` with one learned scale (:class:`GaussianScale`,
  the sigma-VAE), calibrated at the start of each phase (:meth:`DistillLoss.calibrate`).
- ``kl``: ``KL(q(z|x) || N(0, I))`` with a free-bits floor (:func:`kl_nats`), or held at a rate
  by a Lagrange multiplier (:class:`RateTarget`); both budgets are in bits per pixel of the
  image, so a teacher with a larger latent gets the same budget as its student.
- ``distill_latent``: ``KL(N(mu_t, T^2 var_t) || N(A mu_s, T^2 (A var_s A^T + r)))``, the
  teacher posterior against the student's through the adapter ``A`` plus the residual variance
  ``r`` (:func:`residual_variance`); the temperature ``T`` discounts the means by ``1 / T^2``.
- ``distill_recon``: ``-log N(teacher_output | student_output, sigma^2)`` with the
  reconstruction's scale (detached); ``bounded``: only where the teacher is closer to the input.
- ``perceptual``: feature matching through a frozen backbone (:func:`build_perceptual`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VGG16_Weights, vgg16

from ..io import CheckpointError, load_checkpoint
from ..metrics import gaussian_kl
from ..vae import LatentAdapter, VAEBase, VAEOutput
from .config import DistillConfig

_LOG_2PI = math.log(2 * math.pi)
_LN2 = math.log(2)
#: Variances in the latent distillation KL are floored here so the ratio stays finite.
VAR_FLOOR = 1e-6


def gaussian_nll(prediction: Tensor, target: Tensor, log_sigma: Tensor,
                 mask: Tensor | None = None) -> Tensor:
    """``-log N(target | prediction, exp(log_sigma)^2)`` in nats per image (batch mean, a
    scalar). ``prediction, target``: ``(B, C, H, W)``; ``log_sigma``: a scalar or ``(C,)``;
    ``mask`` (0 or 1, ``target``'s shape, no gradient) keeps only some numbers."""
    if prediction.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    ls = log_sigma.float()
    if ls.dim() == 1 and ls.numel() != target.shape[1]:
        raise ValueError(f"log_sigma has {ls.numel()} scales for {target.shape[1]} channels")
    if ls.dim() > 1:
        raise ValueError(f"log_sigma must be a scalar or (C,), got {tuple(ls.shape)}")
    err = F.mse_loss(prediction.float(), target.float(), reduction="none")
    count = float(target[0, 0].numel())  # numbers per image and channel
    if mask is not None:
        m = mask.detach().to(err.dtype)
        err, count = err * m, m.flatten(2).sum(2)
    # per image and channel, the sums first (fewer passes over the images than per number)
    nll = 0.5 * err.flatten(2).sum(2) * torch.exp(-2 * ls).flatten() + count * (
        ls.flatten() + 0.5 * _LOG_2PI)
    return nll.sum(1).mean()


class GaussianScale(nn.Module):
    """A learned likelihood scale: ``log_sigma`` of one scalar (``channels=None``) or one per
    colour channel, to start near the model's RMS error (:meth:`calibrate`)."""

    def __init__(self, sigma: float = 0.1, channels: int | None = None) -> None:
        super().__init__()
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


#: Where :func:`kl_nats` applies its free-bits floor.
FREE_BITS_MODES = ("channel", "total")


def kl_nats(mu: Tensor, logvar: Tensor, free_bits: float = 0.0,
            mode: str = "total") -> Tensor:
    """KL of the posterior ``(B, C, h, w)`` (or a vector latent ``(B, C)``) to N(0, I) in nats
    per image, with a floor of ``free_bits`` >= 0 nats per latent element: on each channel's
    batch-mean KL (``mode="channel"``) or on the image's (``"total"``). A binding floor gives no
    gradient."""
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


#: The rate multiplier's range: beyond 1e3 one nat of rate outweighs thousands of nats of
#: reconstruction, and an overshoot there took ``make demo``'s teacher to non-finite losses.
MULTIPLIER_RANGE = (1e-4, 1e3)


class RateTarget(nn.Module):
    """A Lagrange multiplier (a buffer) holding the KL at ``target`` > 0 (bits per pixel):
    the loss uses ``multiplier * kl``; :meth:`update` does ``log m += step_size * min(kl / target
    - 1, 1)`` after each optimiser step."""

    multiplier: Tensor

    def __init__(self, target: float, initial: float = 1.0, step_size: float = 0.01) -> None:
        super().__init__()
        self.target, self.step_size = target, step_size
        self.register_buffer("multiplier", torch.tensor(float(initial)))

    @torch.no_grad()
    def update(self, rate: float) -> float:
        """One dual step from the KL just measured (``target``'s unit); returns the new
        multiplier. The relative excess is capped at 1 (a rate far above the target, such as a
        near-lossless start's, grows the multiplier by at most ``exp(step_size)`` a step)."""
        excess = min(rate / self.target - 1, 1.0)
        self.multiplier.mul_(math.exp(self.step_size * excess)).clamp_(*MULTIPLIER_RANGE)
        return float(self.multiplier)


def latent_distillation_nats(teacher_mu: Tensor, teacher_var: Tensor, student_mu: Tensor,
                             student_var: Tensor, temperature: float) -> Tensor:
    """``KL(N(mu_t, T^2 var_t) || N(mu_s, T^2 var_s))`` in nats per image (batch mean); all
    four ``(B, C_t, h, w)``, the student mapped to the teacher's latent. Per element
    ``0.5 ln(var_s / var_t) + var_t / (2 var_s) - 0.5 + (mu_t - mu_s)^2 / (2 T^2 var_s)``;
    variances floored at ``VAR_FLOOR``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    var_t = teacher_var.float().clamp(min=VAR_FLOOR)
    var_s = student_var.float().clamp(min=VAR_FLOOR)
    spread = 0.5 * (var_s.log() - var_t.log()) + var_t / (2 * var_s) - 0.5
    mean = (teacher_mu.float() - student_mu.float()).pow(2) / (2 * temperature ** 2 * var_s)
    return (spread + mean).flatten(1).sum(1).mean()


def output_distillation_nll(student_output: Tensor, teacher_output: Tensor, log_sigma: Tensor,
                            mask: Tensor | None = None) -> Tensor:
    """``-log N(teacher_output | student_output, sigma^2)`` in nats per image (``(B, 3, H, W)``
    in [0, 1]), the reconstruction's ``log_sigma`` detached; ``mask`` as in :func:`gaussian_nll`."""
    return gaussian_nll(student_output, teacher_output.detach(), log_sigma.detach(), mask)


def value_shares(weighted: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Each weighted term's share ``|w_i L_i| / sum_j |w_j L_j|`` of the objective, in [0, 1]
    (absolute: a Gaussian NLL with a small scale is negative)."""
    vals = {k: abs(float(v.detach() if isinstance(v, Tensor) else v))
            for k, v in weighted.items()}
    total = sum(vals.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in vals.items()}


def gradient_shares(weighted: Mapping[str, Tensor], parameters: Sequence[Tensor]
                    ) -> dict[str, float]:
    """Each weighted term's share ``||g_i|| / sum_j ||g_j||`` of the gradient norm over
    ``parameters`` (one backward pass per term, the graph kept; unreached terms: 0)."""
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


#: Names of the five terms, in the order they are logged.
TERMS: tuple[str, ...] = ("recon", "kl", "distill_latent", "distill_recon", "perceptual")
#: Seed of the posterior samples the scale is calibrated on (a generator of its own: the
#: training run's random stream is not touched).
CALIBRATION_SEED = 0
#: Checkpoint keys of the likelihood scale ``log sigma`` and of the rate multiplier.
SCALE_KEY, RATE_KEY = "likelihood_log_sigma", "rate_multiplier"
#: Dual step of the rate multiplier (``docs/results.md``: at 0.01 or 0.1 the KL drifted 8-12%
#: above the target over 3 demo epochs; at 0.5 it is back at the target in the third).
RATE_STEP = 0.5


class TeacherTargets(NamedTuple):
    """The frozen teacher's outputs for a batch: ``mu``, ``logvar`` ``(B, teacher_dim, H/8,
    W/8)``, ``reconstruction`` ``(B, 3, H, W)`` in [0, 1]."""

    mu: Tensor
    logvar: Tensor
    reconstruction: Tensor


@torch.no_grad()
def teacher_targets(teacher: nn.Module, x: Tensor) -> TeacherTargets:
    """The ``teacher``'s outputs (float32) for images ``x`` (B, 3, H, W) in [0, 1]; put the
    teacher in eval mode first."""
    out = teacher(x)
    return TeacherTargets(out.mu.float(), out.logvar.float(), out.reconstruction.float())


def adapt(adapter: LatentAdapter, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """The student posterior pushed through the linear ``adapter``: (mean, marginal variance),
    both ``(B, teacher_dim, h, w)``."""
    return adapter(mu), adapter.variance(logvar.float().exp())


def residual_variance(adapted_mu: Tensor, adapted_var: Tensor, teacher: TeacherTargets) -> Tensor:
    """Per teacher channel, the variance of the teacher's posterior sample that the adapted
    student posterior does not explain (the moment-matched variance of ``p(z_t | z_s)``): the
    mean over batch and positions of ``(mu_t - A mu_s)**2 + var_t - A var_s A^T``, at least 0,
    shape ``(1, teacher_dim, 1, 1)`` (``(1, teacher_dim)`` for vector latents), detached. A
    teacher channel left at its prior (mean 0, variance 1) thus costs a sure student nothing."""
    with torch.no_grad():
        err = ((teacher.mu.float() - adapted_mu.float()).pow(2) + teacher.logvar.float().exp()
               - adapted_var.float())
        return err.mean(dim=(0, *range(2, err.dim())), keepdim=True).clamp(min=0)


def latent_distillation(adapted_mu: Tensor, adapted_var: Tensor, teacher: TeacherTargets,
                        temperature: float) -> Tensor:
    """The ``distill_latent`` term in nats per image: the teacher posterior against
    ``N(A mu_s, A var_s A^T + r)``, ``r`` the :func:`residual_variance`."""
    var = adapted_var + residual_variance(adapted_mu, adapted_var, teacher)
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
    """What a phase trains, in one module: the model, the likelihood scale and maybe the
    adapter. ``x -> (VAEOutput, (adapted_mu, adapted_var) or None)``."""

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
    (unweighted) and ``"total"`` (the weighted sum). The arguments are the config fields of the
    same names (``bounded``: ``distill_recon_bounded``; ``kl_free_bits`` and ``kl_target`` in
    bits per pixel); ``kl_target`` weights the KL (no floor)
    by a :class:`RateTarget` starting at ``kl_weight``; ``perceptual``: a frozen backbone
    (images in [0, 1] to feature maps) or ``None``. ``scale`` is the learned likelihood scale."""

    def __init__(self, *, recon_weight: float = 0.3, kl_weight: float = 0.1,
                 distill_latent_weight: float = 0.3, distill_recon_weight: float = 0.2,
                 perceptual_weight: float = 0.1, kl_free_bits: float = 6.0,
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
        return cls.from_config(config.model_copy(update={"perceptual_weight": 0.0}),
                               distill=False)

    @property
    def needs_teacher(self) -> bool:
        """Whether a term with a non-zero weight needs the teacher's outputs."""
        return self.weights["distill_latent"] > 0 or self.weights["distill_recon"] > 0

    def calibrate(self, model: VAEBase, x: Tensor) -> float:
        """Set the scale to the RMS error of ``model``'s seeded sampled reconstruction of
        images ``x`` in [0, 1] (the maximum-likelihood scale). Returns ``sigma``."""
        self.scale.calibrate(model.decode_sample(x, CALIBRATION_SEED), x)
        return float(self.scale.sigma.detach())

    def after_step(self, bpp: float) -> None:
        """After an optimizer step: move the rate multiplier from the KL in bits per pixel."""
        if self.rate is not None:
            self.rate.update(bpp)

    def _state(self) -> dict[str, Tensor]:
        state = {SCALE_KEY: self.scale.log_sigma}
        if self.rate is not None:
            state[RATE_KEY] = self.rate.multiplier
        return state

    def scale_payload(self) -> dict[str, Any]:
        """The checkpoint keys of the likelihood scale and (with a ``kl_target``) the rate."""
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
        """``{term: scalar}`` for the five terms and ``"total"`` of images ``x`` (B, 3, H, W) in
        [0, 1]; ``adapted``: ``adapt(adapter, student.mu, student.logvar)`` (with a teacher). A
        term that cannot be computed (no teacher, no backbone) is 0."""
        if teacher is None and self.needs_teacher:
            raise ValueError("the distillation terms have non-zero weights but no teacher "
                             "outputs were given")
        zero = x.new_zeros((), dtype=torch.float32)
        recon, target = student.reconstruction.float(), x.float()
        nats_per_bpp = x.shape[-2] * x.shape[-1] * _LN2  # nats per image of 1 bit per pixel
        floor = 0.0 if self.rate is not None else self.kl_free_bits * nats_per_bpp / \
            student.mu[0].numel()
        log_sigma = self.scale.log_sigma
        terms = {
            "recon": self.scale(recon, target),
            "kl": kl_nats(student.mu, student.logvar, floor, self.free_bits_mode),
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
            terms["bpp"] = terms["kl"].detach() / nats_per_bpp
        return terms


# ---------------------------------------------------------------- perceptual backbones

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Indices in ``vgg16().features`` of the ReLUs whose outputs are matched (relu1_2, relu2_2).
VGG_LAYERS: tuple[int, ...] = (3, 8)
#: Encoder blocks of the teacher whose outputs are matched (see :func:`encoder_blocks`).
TEACHER_BLOCKS = 1


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class VGG16Features(nn.Module):
    """VGG16 feature maps at ``VGG_LAYERS`` of ImageNet-normalised images; ``state_dict``:
    torchvision ``vgg16`` weights (at least the ``features.*`` used; ``None``: random)."""

    def __init__(self, state_dict: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.features = vgg16(weights=None).features[: max(VGG_LAYERS) + 1]
        if state_dict is not None:
            prefix = "features."
            own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            needed = set(self.features.state_dict())
            missing = sorted(needed - set(own))
            if missing:
                raise ValueError(f"vgg16 weights lack the layers used by the perceptual loss: "
                                 f"features.{missing[0]} (and {len(missing) - 1} more)")
            self.features.load_state_dict({k: own[k] for k in needed})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        _freeze(self)

    def train(self, mode: bool = True) -> VGG16Features:  # always eval: frozen backbone
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG_LAYERS:
                out.append(x)
        return out


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's blocks: its children in registration order, ``nn.ModuleList`` holders
    expanded, modules without parameters (PixelUnshuffle, activations) left out."""
    blocks: list[nn.Module] = []
    for child in encoder.children():
        if isinstance(child, nn.ModuleList):
            blocks += encoder_blocks(child)
        elif any(True for _ in child.parameters()):
            blocks.append(child)
    return blocks


class _AllTapped(Exception):
    """Raised by the last hook: the encoder need not run further."""


class TeacherFeatures(nn.Module):
    """``(B, 3, H, W)`` images in [0, 1] -> the outputs of the first ``blocks`` encoder blocks
    (:func:`encoder_blocks`) of a frozen teacher, in call order; the encoder stops there."""

    def __init__(self, teacher: VAEBase, blocks: int = TEACHER_BLOCKS) -> None:
        super().__init__()
        self.encoder = _freeze(teacher).encoder
        self.taps = encoder_blocks(self.encoder)
        if len(self.taps) < blocks:
            raise ValueError(f"the teacher's encoder has {len(self.taps)} blocks with "
                             f"parameters, {blocks} needed for the perceptual backbone")
        self.blocks = blocks

    def train(self, mode: bool = True) -> TeacherFeatures:  # always eval: frozen backbone
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        out: list[Tensor] = []

        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            out.append(output)
            if len(out) == self.blocks:
                raise _AllTapped

        handles = [m.register_forward_hook(hook) for m in self.taps]
        try:
            self.encoder(x)
        except _AllTapped:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(out) < self.blocks:
            raise RuntimeError(f"the teacher's encoder ran {len(out)} of its blocks, "
                               f"{self.blocks} needed for the perceptual backbone")
        return out


def hub_vgg16_path() -> Path:
    """Where torchvision caches the ImageNet VGG16 weights (``$TORCH_HOME/hub/checkpoints``)."""
    filename = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def find_vgg16_weights(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The VGG16 weights file: ``path`` (``ValueError`` if missing), else the torch hub cache's,
    else ``None``."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"vgg16_weights: no such file {p}")
        return p
    cached = hub_vgg16_path()
    return cached if cached.is_file() else None


def resolve_backbone(kind: str, vgg16_weights: str | None = None,
                     allow_download: bool = True) -> str:
    """``kind`` with ``auto`` resolved: ``vgg16`` when its weights are on disk (``vgg16_weights``
    or the torch hub cache), else ``teacher``. ``vgg16`` with no weights on disk and no
    ``allow_download`` is a ``ValueError`` saying how to proceed."""
    local = find_vgg16_weights(vgg16_weights) if kind != "teacher" else None
    if kind == "auto":
        return "vgg16" if local is not None else "teacher"
    if kind == "vgg16" and local is None and not allow_download:
        raise ValueError(
            f"vgg16 perceptual backbone: no weights at {hub_vgg16_path()} and downloading is not "
            "allowed; pass --download, give --vgg16-weights PATH, or use "
            "--perceptual-backbone teacher (or auto)")
    return kind


def build_perceptual(kind: str, teacher: VAEBase | None = None, vgg16_weights: str | None = None,
                     allow_download: bool = False) -> tuple[nn.Module, str]:
    """The backbone for ``kind`` (``auto``, ``vgg16`` or ``teacher``) and its resolved name;
    ``vgg16`` downloads its weights only with ``allow_download`` (see :func:`resolve_backbone`)."""
    kind = resolve_backbone(kind, vgg16_weights, allow_download)
    if kind == "teacher":
        if teacher is None:
            raise ValueError("the teacher perceptual backbone needs a teacher model")
        return TeacherFeatures(teacher), "teacher"
    local = find_vgg16_weights(vgg16_weights)
    state = (load_checkpoint(local) if local is not None else
             VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True))
    return VGG16Features(state), "vgg16"
