"""The TinyVAE perception plugin: the distilled student's encoder, refined in latent space.

Registered as ``"tinyvae"`` through the ``register_irp_plugins`` hook (this module is both a
built-in and the ``tinyvae`` entry point of the ``hrm_vision.irp_plugins`` group).

- ``init_state``: the amortized guess, the student encoder's posterior mean ``mu``
  ``(B, latent_dim, H/8, W/8)``; exactly ``model.encode(images)``.
- ``energy``: per image, the mean squared error between the image and the decoded latent plus
  ``prior_weight * 0.5 * mean(z**2)`` (a small standard-normal prior term); lower is better.
  The state's ``energy_val`` is the batch mean.
- ``step``: one gradient step on the latent per image, along the gradient normalised to unit RMS
  and of length ``step_size`` (per element, in latent units), with backtracking: the step is
  halved up to ``max_backtracks`` times until the image's energy does not rise, otherwise that
  image keeps its latent. An accepted step size grows by 1.5 for the next update. So every
  image's energy is non-increasing, and so is the batch mean.
- ``project``: each latent element is clamped to ``[-latent_bound, latent_bound]`` widened to
  include the encoder's own ``mu`` (so the initial guess is always in range).

So ``refine(x, max_steps=1)`` returns exactly the plain encoder output, and more steps can only
lower the energy.

Inputs (``x0``): a torch float tensor in [0, 1], NCHW (or CHW for one image), RGB; or a numpy
uint8 frame HWC (or NHWC batch), RGB or BGR (``channel_order="bgr"`` in the config, or in
``task_ctx`` per call, for OpenCV frames). Sizes whose height or width is not a multiple of 8 are
rejected with a ``ValueError`` (``on_bad_size="reject"``, the default) or resized bilinearly to
the nearest multiple of 8, at least 8 (``on_bad_size="resize"``); the reconstruction then has the
resized size. An input with no pixels (an empty batch, a 0-pixel side) or with NaN or infinite
values is a ``ValueError`` saying so. The caller's array or tensor is never modified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from ..io import CheckpointError, load
from ..vae import MinimalVAE
from .base import IRPConfig, IRPPlugin, IRPState
from .hookspecs import hookimpl

ChannelOrder = Literal["rgb", "bgr"]
#: Growth of an accepted step size for the next update.
STEP_GROWTH = 1.5


class TinyVAEConfig(IRPConfig):
    """Config of the ``tinyvae`` plugin (plus ``max_steps``, ``halt_eps``, ``halt_window``)."""

    checkpoint: Path = Field(description="the distiller's tinyvae_best.pth (role 'student'), "
                                         "or a .safetensors file from hrm_vision.save")
    device: str = Field("cpu", description="torch device the model runs on")
    step_size: float = Field(0.1, gt=0, description="initial latent step (RMS per element)")
    max_backtracks: int = Field(4, ge=0, description="halvings of a step that raised the energy")
    prior_weight: float = Field(1e-4, ge=0, description="weight of the 0.5*mean(z^2) prior term")
    latent_bound: float = Field(6.0, gt=0, description="latent range (widened to include mu)")
    channel_order: ChannelOrder = Field("rgb", description="channel order of numpy uint8 frames")
    on_bad_size: Literal["reject", "resize"] = Field(
        "reject", description="sizes not divisible by 8: ValueError, or resize to a multiple of 8")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"checkpoint file not found: {value} (train one with "
                             "training/distill_tinyvae.py; it writes checkpoints/tinyvae_best.pth)")
        return value

    @field_validator("device")
    @classmethod
    def _device_available(cls, value: str) -> str:
        try:
            device = torch.device(value)
        except RuntimeError as exc:
            raise ValueError(f"not a torch device: {value!r}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {value!r} requested but CUDA is not available")
        return value


class Perception(NamedTuple):
    """What :meth:`TinyVAEPlugin.perceive` returns.

    latent: ``(B, latent_dim, H/8, W/8)`` float (a single image comes back with B = 1).
    reconstruction: ``(B, 3, H, W)`` float RGB in [0, 1], the decoded latent.
    telemetry: the JSON-safe record of the run (see ``telemetry.schema.json``).
    """

    latent: Tensor
    reconstruction: Tensor
    telemetry: dict[str, Any]


def to_image_batch(x: Any, channel_order: ChannelOrder = "rgb",
                   on_bad_size: str = "reject") -> Tensor:
    """Convert a frame or batch to a new float RGB NCHW tensor in [0, 1] (never a view of ``x``).

    Raises ``ValueError`` naming the problem for a wrong type, dtype, layout or range, an input
    with no pixels, NaN or infinite values, and (``on_bad_size="reject"``) a side that is not a
    multiple of 8.

    Args:
        x: torch float tensor in [0, 1], ``(B, 3, H, W)`` or ``(3, H, W)``, RGB; or numpy
            uint8 ``(H, W, 3)`` or ``(B, H, W, 3)`` in ``channel_order``.
        channel_order: ``"rgb"`` or ``"bgr"``; applies to numpy frames only.
        on_bad_size: ``"reject"`` (``ValueError``) or ``"resize"`` for sizes not divisible by 8.
    """
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ValueError(f"numpy frames must be uint8 HWC (0-255), got dtype {x.dtype}; pass "
                             "float images as a torch tensor NCHW in [0, 1]")
        if x.ndim not in (3, 4) or x.shape[-1] != 3:
            raise ValueError(f"numpy frames must be (H, W, 3) or (B, H, W, 3), got {x.shape}")
        batch = x[None] if x.ndim == 3 else x
        _check_not_empty(batch.shape[0], batch.shape[1], batch.shape[2], x.shape)
        if channel_order == "bgr":
            batch = batch[..., ::-1]
        images = torch.from_numpy(np.array(batch, dtype=np.uint8, copy=True))
        images = images.permute(0, 3, 1, 2).float().div(255.0).contiguous()
    elif isinstance(x, Tensor):
        if not x.is_floating_point():
            raise ValueError(f"torch images must be float in [0, 1], got dtype {x.dtype}; "
                             "convert uint8 with x.float() / 255")
        if x.dim() not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(f"torch images must be (B, 3, H, W) or (3, H, W) RGB, got "
                             f"{tuple(x.shape)}; channels-last input needs x.permute(0, 3, 1, 2)")
        images = (x[None] if x.dim() == 3 else x).detach().float().clone()
        _check_not_empty(images.shape[0], images.shape[2], images.shape[3], tuple(x.shape))
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            raise ValueError(f"the image holds {int((~finite).sum())} NaN or infinite value(s) "
                             f"of {images.numel()}; images must be finite floats in [0, 1]")
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"torch images must be in [0, 1], got values in "
                             f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")
    else:
        raise ValueError(f"expected a torch tensor or a numpy uint8 frame, got {type(x).__name__}")
    h, w = images.shape[-2:]
    if h % 8 or w % 8:
        if on_bad_size != "resize":
            raise ValueError(f"image size {h}x{w} is not a multiple of 8, which the TinyVAE "
                             "needs; crop or resize it, or set on_bad_size='resize'")
        size = (max(8, round(h / 8) * 8), max(8, round(w / 8) * 8))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                               antialias=True).clamp_(0, 1)
    return images


def _check_not_empty(batch: int, height: int, width: int, shape: Any) -> None:
    if batch == 0:
        raise ValueError(f"the input holds no image (empty batch, shape {tuple(shape)})")
    if height == 0 or width == 0:
        raise ValueError(f"the image has no pixels ({height}x{width}, shape {tuple(shape)})")


class LatentRefiner:
    """The refinement maths of the plugin (see the module docstring), for any VAE whose
    ``encode``/``decode`` map images ``(B, C, H, W)`` in [0, 1] to latents ``(B, ...)`` and back.

    The state's ``meta`` holds ``target`` (the images), ``energies`` ``(B,)``, the latent range
    ``lower``/``upper`` and the per-image ``step_size`` ``(B,)``; ``batch_size``.
    """

    def __init__(self, model: torch.nn.Module, step_size: float, max_backtracks: int,
                 prior_weight: float, latent_bound: float) -> None:
        self.model = model
        self.step_size = step_size
        self.max_backtracks = max_backtracks
        self.prior_weight = prior_weight
        self.latent_bound = latent_bound

    def energies(self, z: Tensor, target: Tensor) -> Tensor:
        """Per-image energy ``(B,)``: MSE of ``decode(z)`` against ``target`` plus the prior term,
        in float32 (also under autocast)."""
        mse = (self.model.decode(z).float() - target).pow(2).flatten(1).mean(1)
        return mse + self.prior_weight * 0.5 * z.float().pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def start(self, target: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """The encoder's mean for ``target`` and the run's ``meta``."""
        mu = self.model.encode(target)
        energies = self.energies(mu, target)
        bound = torch.full_like(mu, self.latent_bound)
        meta = {"target": target, "energies": energies, "batch_size": mu.shape[0],
                "lower": torch.minimum(mu, -bound), "upper": torch.maximum(mu, bound),
                "step_size": torch.full((mu.shape[0],), self.step_size, device=mu.device)}
        return mu, meta

    def step(self, z: Tensor, meta: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """One backtracking gradient step per image: ``(new latent, new meta)``; no image's
        energy rises (an image whose every trial rose keeps its latent)."""
        target, old = meta["target"], meta["energies"]
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.energies(zg, target).sum(), zg)
        per_image = (-1,) + (1,) * (z.dim() - 1)
        grad = grad.float()
        rms = grad.pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-12)
        direction = grad / rms.view(per_image)
        size = meta["step_size"].clone()
        new_z, new_e = z.clone(), old.clone()
        pending = torch.ones_like(old, dtype=torch.bool)
        with torch.no_grad():
            for _ in range(self.max_backtracks + 1):
                idx = pending.nonzero().squeeze(1)
                cand = torch.clamp(z[idx] - size[idx].view(per_image) * direction[idx],
                                   meta["lower"][idx], meta["upper"][idx]).to(z.dtype)
                e = self.energies(cand, target[idx])
                ok = e <= old[idx]
                new_z[idx[ok]], new_e[idx[ok]] = cand[ok], e[ok]
                pending[idx[ok]] = False
                size[idx[~ok]] *= 0.5
                if not pending.any():
                    break
            size[~pending] *= STEP_GROWTH
        return new_z, {**meta, "energies": new_e, "step_size": size}


class TinyVAEPlugin(IRPPlugin):
    """IRP perception plugin around a trained ``MinimalVAE`` (see the module docstring).

    Args:
        config: a validated :class:`TinyVAEConfig`; the checkpoint (``.pth`` or
            ``.safetensors``) is loaded here with
            ``hrm_vision.load(path, role="student")``, on the CPU, then
            moved to ``config.device``.

    Raises:
        CheckpointError: the checkpoint is unreadable, holds no student, holds non-finite
            weights, or the student is not a TinyVAE (``MinimalVAE``). Never falls back to
            random weights.
    """

    name = "tinyvae"
    kind = "perception"
    config: TinyVAEConfig

    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__(config)
        model = load(config.checkpoint, role="student")
        if not isinstance(model, MinimalVAE):
            raise CheckpointError(f"{config.checkpoint}: the student is a {type(model).__name__}; "
                                  "the tinyvae plugin needs a MinimalVAE (TinyVAE) checkpoint")
        self.device = torch.device(config.device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.refiner = LatentRefiner(self.model, config.step_size, config.max_backtracks,
                                     config.prior_weight, config.latent_bound)

    # ------------------------------------------------------------------ helpers
    def images(self, x0: Any, task_ctx: dict[str, Any] | None = None) -> Tensor:
        """``x0`` as float RGB NCHW in [0, 1] on the plugin's device (see :func:`to_image_batch`).

        ``task_ctx["channel_order"]`` overrides the config's ``channel_order`` for this call.
        """
        order = (task_ctx or {}).get("channel_order", self.config.channel_order)
        if order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {order!r}")
        return to_image_batch(x0, order, self.config.on_bad_size).to(self.device)

    def energies(self, z: Tensor, target: Tensor) -> Tensor:
        """Per-image energy ``(B,)`` of latents ``z`` for images ``target`` (B, 3, H, W)."""
        return self.refiner.energies(z, target)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction ``(B, 3, H, W)`` in [0, 1] of latents ``z``."""
        return self.model.decode(z)

    # ------------------------------------------------------------------ IRP primitives
    def init_state(self, x0: Any, task_ctx: dict[str, Any]) -> IRPState:
        """The encoder's ``mu`` for ``x0``, with per-image energies and step sizes in ``meta``."""
        mu, meta = self.refiner.start(self.images(x0, task_ctx))
        return IRPState(mu, 0, float(meta["energies"].mean()), meta)

    @torch.no_grad()
    def energy(self, state: IRPState) -> float:
        """Batch-mean energy of ``state.x`` against the state's images."""
        return float(self.energies(state.x, state.meta["target"]).mean())

    def project(self, state: IRPState) -> IRPState:
        """``state`` with its latent clamped to the range set at ``init_state``."""
        z = torch.clamp(state.x, state.meta["lower"], state.meta["upper"])
        if torch.equal(z, state.x):
            return state
        return IRPState(z, state.step_idx, None, state.meta)

    def step(self, state: IRPState) -> IRPState:
        """A backtracking gradient step per image (see the module docstring)."""
        z, meta = self.refiner.step(state.x, state.meta)
        return IRPState(z, state.step_idx + 1, float(meta["energies"].mean()), meta)

    # ------------------------------------------------------------------ convenience
    def perceive(self, x0: Any, task_ctx: dict[str, Any] | None = None,
                 max_steps: int | None = None, input_id: str | int | None = None) -> Perception:
        """Refine ``x0`` and return its latent, reconstruction and telemetry."""
        result = self.run(x0, task_ctx, max_steps, input_id)
        latent = result.state.x.detach()
        return Perception(latent, self.decode(latent), result.telemetry)


@hookimpl
def register_irp_plugins(register: Any) -> None:
    """Register the ``tinyvae`` perception plugin."""
    register("tinyvae", TinyVAEPlugin, TinyVAEConfig, kind="perception",
             description="TinyVAE encoder (distilled student) refined in latent space")
