"""The drop-in for SAGE's TinyVAE IRP plugin over the ``tinyvae`` plugin (docs/irp.md, "Inside
SAGE"); :class:`SageVAE` is SAGE's model-level ``TinyVAE``.

    from hrm_vision.irp.sage import create_tinyvae_irp   # was sage.irp.plugins.tinyvae_irp_plugin
    tinyvae = create_tinyvae_irp(latent_dim=64, input_channels=3, use_fp16=True, beta_kl=0.1)
    latent, telemetry = tinyvae.refine(crop)          # crop (1, 3, 64, 64) float in [0, 1]
"""

from __future__ import annotations

import importlib
import math
import os
import time
import warnings
from collections.abc import Sequence
from functools import cache
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, Field
from torch import Tensor, nn

from ..compact import CompactStudentVAE
from ..io import load, shipped_weights
from ..metrics import gaussian_kl
from .contract import IRPState, finite_or_none, trust_metrics, validate_config
from .tinyvae import TinyVAEConfig, TinyVAEPlugin, TinyVAESettings, from_images, load_student

CHECKPOINT_ENV = "HRM_VISION_SAGE_CHECKPOINT"  # the checkpoint when a call passes none
_MISSING: Any = object()


def sage_trust(mse: float, kl_per_dimension: float) -> float:
    """SAGE's trust in [0, 1] of a reconstruction with mean squared error ``mse`` (pixels in
    [0, 1]) and posterior KL to N(0, I) ``kl_per_dimension`` (nats per latent number):
    ``0.5 * max(0, 1 - 10 * mse) + 0.5 / (1 + kl_per_dimension)``."""
    if not (mse >= 0 and kl_per_dimension >= 0):
        raise ValueError(f"mse and KL must be >= 0, got {mse}, {kl_per_dimension}")
    return min(1.0, 0.5 * max(0.0, 1.0 - 10.0 * mse) + 0.5 / (1.0 + kl_per_dimension))


class Sizes(NamedTuple):
    """Latent size, channels of the caller's crops, crop side."""

    latent_dim: int
    input_channels: int
    img_size: int


class Halting(BaseModel):
    """The halting keys, read from ``plugin.config`` (SAGE writes into it) at every check."""

    max_iterations: Annotated[int, AfterValidator(lambda n: max(1, n))] = 20  # below 1: 1
    halt_eps: float = Field(1e-4, ge=0)  # relative to the first energy
    halt_K: int = Field(3, ge=1)


class SageConfig(TinyVAESettings, Halting):
    """SAGE's keys and the plugin's, with SAGE's defaults (docs/irp.md, "Inside SAGE")."""

    entity_id: str = "tinyvae_irp"
    trust_weight: float = 1.0
    ATP_per_step: float = Field(0.1, ge=0)
    max_ATP: float | None = None
    LRC_context: Any = None
    latent_dim: int | None = Field(None, ge=1)  # None: the checkpoint's, else 64
    beta_kl: float = Field(0.1, ge=0)
    normalize: bool = False  # with mean and std: SAGE's own normalisation, not used here
    mean: list[float] | None = None
    std: list[float] | None = None
    device: str | None = Field(None, validate_default=True)  # None: CUDA if available
    channel_order: Literal["rgb", "bgr"] | None = None  # None: tensors RGB, numpy refused
    input_channels: Literal[1, 3] | None = None  # None: the checkpoint's
    resize: bool = True


#: The shipped weights SAGE's factory starts from when given no checkpoint.
SHIPPED = "compact_student"


def sage_model(checkpoint: Any, latent_dim: int | None = None, input_channels: int | None = None,
               img_size: int | None = None) -> tuple[nn.Module, Sizes]:
    """The checkpoint's student and sizes; a ``ValueError`` names a size kwarg that disagrees
    with it. Without a checkpoint: the shipped ``compact_student`` (``hrm_vision.load``) at
    SAGE's sizes (64 numbers, 3x64x64 crops) when the package ships it, else
    :func:`untrained_model`."""
    if checkpoint is None:
        sizes = Sizes(latent_dim or 64, input_channels or 3, img_size or 64)  # SAGE's
        if sizes == Sizes(64, 3, 64) and SHIPPED in shipped_weights():
            return load(SHIPPED), sizes
        warnings.warn("create_tinyvae_irp without a checkpoint at these sizes: an untrained "
                      "compact student (a whole-crop DCT); pass checkpoint='compact_best.pth' "
                      "for trained weights", UserWarning, stacklevel=4)
        return untrained_model(sizes.latent_dim, sizes.img_size), sizes
    model = load_student(checkpoint)
    where, dim = f"the checkpoint {checkpoint}", int(model.latent_dim)
    if latent_dim is not None and latent_dim != dim:
        raise ValueError(f"latent_dim={latent_dim} disagrees with {where}, whose model has "
                         f"latent_dim {dim}; drop latent_dim or pass {dim}")
    channels = int(getattr(model, "in_channels", 3))
    if input_channels == 3 and channels == 1:
        raise ValueError(f"input_channels=3 disagrees with {where}, whose model takes 1-channel "
                         "crops; pass input_channels=1 and grey crops")
    fixed = model.arch_config().get("image_size")  # the compact models take one crop size
    if img_size is not None and fixed is not None and img_size != fixed:
        raise ValueError(f"img_size={img_size} disagrees with {where}, whose model takes "
                         f"{fixed}x{fixed} crops; drop img_size or pass {fixed}")
    return model, Sizes(dim, input_channels or channels, img_size or fixed or 64)


def untrained_model(latent_dim: int, img_size: int) -> nn.Module:
    """The compact student, untrained: its linear path is a whole-crop DCT."""
    return CompactStudentVAE(latent_dim=latent_dim, image_size=img_size)


class SageVAE(nn.Module):
    """SAGE's ``TinyVAE(input_channels, latent_dim, img_size)``: ``mu, logvar = vae.encode(x)``,
    ``recon, mu, logvar = vae(x)``; images ``(B, input_channels, img_size, img_size)`` in [0, 1]."""

    reparameterize = staticmethod(CompactStudentVAE.reparameterize)

    def __init__(self, input_channels: int = 3, latent_dim: int = 64, img_size: int = 64,
                 checkpoint: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.model = sage_model(checkpoint, latent_dim, input_channels, img_size)[0]
        self.input_channels, self.latent_dim, self.img_size = input_channels, latent_dim, img_size

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.model.in_channels == 3 and x.dim() == 4 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.model.posterior(x)

    def decode(self, z: Tensor) -> Tensor:
        images = self.model.decode(z)
        return images.mean(1, keepdim=True) if images.shape[1] != self.input_channels else images

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar) if self.training else mu), mu, logvar


class TinyVAEIRP:
    """SAGE's TinyVAE IRP plugin over :class:`TinyVAEPlugin`; a ``ValueError`` names a bad or
    unknown key, a size that disagrees with the checkpoint or an unavailable device."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = config or {}
        if "checkpoint" not in config and os.environ.get(CHECKPOINT_ENV):
            config = {**config, "checkpoint": os.environ[CHECKPOINT_ENV]}
        settings = validate_config(SageConfig, config, "create_tinyvae_irp")
        if settings.normalize:
            warnings.warn("normalize=True: SAGE's own TinyVAE normalised [0, 1] crops inside the "
                          "plugin; this model reads crops as they are, in value_range "
                          f"{settings.value_range}, so normalize/mean/std are not used",
                          UserWarning, stacklevel=3)
        model, sizes = sage_model(settings.checkpoint, settings.latent_dim,
                                  settings.input_channels, settings.img_size)
        shared = settings.model_dump(include=set(TinyVAESettings.model_fields))
        shared.update(input_channels=sizes.input_channels, img_size=sizes.img_size)
        self.plugin = TinyVAEPlugin(TinyVAEConfig(**shared), model)
        self.model, self.device = self.plugin.model, self.plugin.device
        self.config: dict[str, Any] = {  # SAGE reads and writes it
            **settings.model_dump(), **sizes._asdict(), "value_range": list(settings.value_range),
            "checkpoint": None if settings.checkpoint is None else str(settings.checkpoint)}
        self.entity_id, self.trust_weight = settings.entity_id, settings.trust_weight
        self.beta_kl, self.use_fp16 = settings.beta_kl, self.plugin.use_fp16
        self.energy_history: list[float] = []
        self.time_history: list[float] = []
        self.latent_dim, self.input_channels, self.img_size = sizes
        self._last_error: str | None = None
        probe = torch.zeros(1, sizes.input_channels, self.img_size, self.img_size)
        self.latent_shape: tuple[int, ...] = tuple(self.encode_batch(probe).shape[1:])

    def encode_batch(self, batch: Any, flat: bool = False) -> Tensor:
        """The encoder's mean, ``(B, *latent_shape)``, or ``(B, N)`` with ``flat=True``."""
        mu = self.plugin.encode(batch)
        return mu.flatten(1) if flat else mu

    def get_latents(self, batch: Any, flat: bool = False, form: str = "float") -> Tensor:
        """:meth:`encode_batch`, or with ``form`` ``"8bit"`` its ``uint8`` codes (one byte per
        number) or ``"tokens"`` ``int64`` ids ``(B, stages)``, both by the ``codes`` file."""
        return self.plugin.to_code(self.encode_batch(batch, flat), form)

    def decode_batch(self, latents: Any) -> Tensor:
        """Reconstructions of ``latents`` (flat or not, torch or numpy; float latents, or the
        ``uint8`` codes or integer token ids of :meth:`get_latents`) in the caller's convention
        (``input_channels``, ``channel_order``, ``value_range``)."""
        z = self.plugin.from_code(torch.as_tensor(latents), self.latent_shape)
        return from_images(self.plugin.decode(z.to(self.device)), self.plugin.format)

    def init_state(self, x0: Any, task_ctx: dict[str, Any] | None = None) -> IRPState:
        """The encoder's mean for crops ``x0``; a refusal is remembered (SAGE's router swallows
        it and goes on with a fallback state, which :meth:`halt` then refuses)."""
        try:
            state = self.plugin.init_state(x0, task_ctx or {})
        except ValueError as exc:
            self._last_error = str(exc)
            raise
        self._last_error = None
        return state

    def energy(self, state: IRPState) -> float:
        return self.plugin.energy(self._checked(state))

    def step(self, state: IRPState, noise_schedule: Any = None) -> IRPState:
        """One deterministic step (``noise_schedule`` is not used)."""
        return self.plugin.step(self._checked(state))

    def project(self, state: IRPState) -> IRPState:
        return state  # step keeps latents in range

    def _checked(self, state: IRPState) -> IRPState:
        meta = getattr(state, "meta", None)
        if not isinstance(meta, dict) or "target" not in meta:
            why = f"; init_state failed: {self._last_error}" if self._last_error else ""
            raise ValueError(f"the state was not made by this plugin's init_state{why}")
        return state

    def halt_reason(self, history: Sequence[IRPState], early_stop: bool = True,
                    max_steps: int | None = None) -> str | None:
        """``"max_steps"`` at ``max_iterations`` (or ``max_steps``) states, ``"slope<eps"`` at a
        mean fall of at most ``halt_eps * |E0|`` per step over ``halt_K`` steps, else ``None``."""
        halting = self._halting()
        if len(history) >= (max_steps or halting.max_iterations):
            return "max_steps"
        e, k = [self._energy_of(s) for s in history], halting.halt_K
        if early_stop and len(e) > k and (e[-1 - k] - e[-1]) / k <= halting.halt_eps * abs(e[0]):
            return "slope<eps"
        return None

    def halt(self, history: Sequence[IRPState]) -> bool:
        return self.halt_reason([self._checked(s) for s in history]) is not None

    def get_halt_reason(self, history: Sequence[IRPState]) -> str:
        return (self.halt_reason(history) or "unknown") if history else "no_history"

    def _halting(self) -> Halting:
        return validate_config(Halting, self.config, "plugin.config")

    def _energy_of(self, state: IRPState) -> float:
        return float(state.energy_val if state.energy_val is not None else self.energy(state))

    def refine(self, x: Any, task_ctx: Any = _MISSING, max_steps: int | None = None,
               *, early_stop: Any = _MISSING) -> tuple[Any, Any]:
        """:meth:`refine_states` for a dict or ``None`` ``task_ctx``, else :meth:`refine_latent`."""
        if early_stop is not _MISSING or task_ctx is _MISSING or isinstance(task_ctx, bool):
            stop = early_stop if early_stop is not _MISSING else task_ctx
            return self.refine_latent(x, True if stop is _MISSING else bool(stop), max_steps)
        return self.refine_states(x, task_ctx, max_steps)

    def refine_states(self, x: Any, task_ctx: dict[str, Any] | None = None,
                      max_steps: int | None = None, early_stop: bool = True
                      ) -> tuple[IRPState, list[IRPState]]:
        """``(final_state, history)``; ``max_steps`` (default ``config['max_iterations']``)
        counts states, the encoder's guess included."""
        history = [self.init_state(x, task_ctx)]
        while self.halt_reason(history, early_stop, max_steps) is None:
            history.append(self.step(history[-1]))
        return history[-1], history

    def refine_latent(self, x: Any, early_stop: bool = True,
                      max_steps: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """``(latent (B, *latent_shape), telemetry)`` with SAGE's keys (docs/irp.md); ``trust``
        is SAGE's (:func:`sage_trust` of the refined latent's reconstruction), ``kl_divergence``
        per latent element."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        state, history = self.refine_states(x, None, max_steps, early_stop)
        z, target, logvar = state.x, state.meta["target"], state.meta["logvar"]
        sq_err = float((self.plugin.decode(z).clamp(0, 1) - target).pow(2).sum())  # syncs
        time_ms = (time.perf_counter() - start) * 1000.0
        mse, kl = sq_err / target.numel(), float(gaussian_kl(z, logvar).mean())
        energies = [float(s.energy_val) for s in history]
        max_iterations = max_steps or self._halting().max_iterations
        reason = self.halt_reason(history, early_stop, max_steps) or "max_steps"
        return z, {
            "entity_id": self.entity_id, "iterations": len(history),
            "max_iterations": max_iterations, "early_stopped": reason != "max_steps",
            "converged": reason == "slope<eps",
            "compute_saved": 1.0 - len(history) / max_iterations,
            "energy_trajectory": [finite_or_none(e) for e in energies],
            "energy_delta": finite_or_none(energies[-1] - energies[0]), "halt_reason": reason,
            "trust": sage_trust(mse, kl) if math.isfinite(mse + kl) else 0.0,
            "reconstruction_error": finite_or_none(mse),
            "psnr_db": finite_or_none(10 * np.log10(1.0 / mse)) if mse > 0 else None,
            "kl_divergence": finite_or_none(kl),
            "latent_dim": self.latent_dim, "latent_norm": finite_or_none(z.norm()),
            "time_ms": finite_or_none(time_ms), "beta_kl": self.beta_kl}

    def compute_trust_metrics(self, history: Sequence[IRPState]) -> dict[str, float]:
        """SAGE's keys: ``monotonicity_ratio``, ``dE_variance``, ``convergence_rate``."""
        trust = trust_metrics([self._energy_of(s) for s in history])
        return {key: finite_or_none(value) or 0.0 for key, value in
                zip(("monotonicity_ratio", "dE_variance", "convergence_rate"), trust, strict=True)}

    def emit_telemetry(self, state: IRPState, history: Sequence[IRPState]) -> dict[str, Any]:
        """SAGE's record of a run (JSON-safe; docs/irp.md), plus ``energy_trajectory``."""
        energies = [finite_or_none(self._energy_of(s)) for s in history or [state]]
        d_e = energies[-1] - energies[-2] if len(energies) > 1 and None not in energies[-2:] \
            else None
        elapsed = (state.timestamp - history[0].timestamp) * 1000.0 if history else 0.0
        return {
            "entity_id": self.entity_id, "plugin": "tinyvae", "step_idx": state.step_idx,
            "E": energies[-1], "dE": finite_or_none(d_e), "steps": len(history),
            "halt_reason": self.halt_reason(history) if history else None,
            "trust": self.compute_trust_metrics(history or [state]),
            "budget": {"ATP_spent": len(history) * float(self.config.get("ATP_per_step", 0.1)),
                       "time_ms": finite_or_none(elapsed) or 0.0, "memory_mb": 0.0},
            "LRC_context": self.config.get("LRC_context"), "energy_trajectory": energies}

    def get_semantic_representation(self, state: IRPState) -> dict[str, Any]:
        """SAGE's vision slot: numpy ``latent``, ``latent_flat``, ``reconstruction``, and more."""
        z = state.x.detach().float()
        return {"latent": z.cpu().numpy(), "latent_flat": z.flatten(1).cpu().numpy(),
                "reconstruction": self.decode_batch(z).cpu().numpy(),
                "energy": finite_or_none(self._energy_of(state)),
                "refinement_steps": state.step_idx}


@cache
def _plugin_class() -> type[TinyVAEIRP]:
    """:class:`TinyVAEIRP`, also a ``sage.irp.base.IRPPlugin`` when ``sage`` imports."""
    try:
        base = importlib.import_module("sage.irp.base").IRPPlugin
    except ImportError as exc:
        if not isinstance(exc, ModuleNotFoundError) or (exc.name or "").split(".")[0] != "sage":
            warnings.warn(f"sage is on the path but does not import ({exc}); the plugin is not "
                          "a sage.irp.base.IRPPlugin", UserWarning, stacklevel=3)
        return TinyVAEIRP
    return type("TinyVAEIRP", (TinyVAEIRP, base), {"__module__": __name__})


def create_tinyvae_irp(device: str | torch.device | None = None, **kwargs: Any) -> TinyVAEIRP:
    """SAGE's factory: a :class:`TinyVAEIRP` from keyword arguments (:class:`SageConfig`)."""
    return _plugin_class()(dict(kwargs) if device is None else {"device": device, **kwargs})
