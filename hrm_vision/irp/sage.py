"""Drop-in for SAGE's TinyVAE IRP plugin: ``create_tinyvae_irp``, ``TinyVAEIRP`` and the
model-level ``TinyVAE`` (:mod:`hrm_vision.irp.sage_model`).

A SAGE user swaps one import::

    # from sage.irp.plugins.tinyvae_irp_plugin import create_tinyvae_irp
    from hrm_vision.irp.sage import create_tinyvae_irp

    tinyvae = create_tinyvae_irp(latent_dim=64, input_channels=3, use_fp16=True, beta_kl=0.1)
    latent, telemetry = tinyvae.refine(crop)          # crop (1, 3, 64, 64) float in [0, 1]

The plugin answers each of SAGE's callers in its own convention:

- ``refine(x)`` or ``refine(x, early_stop)`` (SAGE's scripts, ``sage/orchestrator``):
  ``(latent, telemetry)`` with a float ``trust`` in [0, 1] (see :meth:`TinyVAEIRP.refine_latent`);
- ``refine(x, task_ctx)`` with a dict (``sage/irp/orchestrator.py``): ``(state, history)``, then
  ``emit_telemetry(state, history)`` in SAGE's layout (:meth:`TinyVAEIRP.emit_telemetry`);
- ``init_state``/``step(state, noise_schedule=None)``/``energy``/``halt(history)`` called one by
  one (``sage/attention/plugin_router.py``).

``config`` is a plain dict with SAGE's keys (``entity_id``, ``max_iterations``, ``halt_eps``,
``halt_K``, ``device``, ``latent_dim``, ``input_channels``, ...) and hrm-vision's own
(``checkpoint``, ``value_range``, ``channel_order``, ...), validated by :class:`SageConfig`;
SAGE writes ``max_iterations`` and ``max_ATP`` into ``plugin.config`` later, which is read at
each run. ``sage`` is imported when a plugin is created, not with this module: with SAGE on the
path the plugin is also an instance of ``sage.irp.base.IRPPlugin``.

Halting: ``halt_eps`` is relative to the first energy (see :meth:`TinyVAEIRP.halt_reason`).
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import load
from .base import IRPState, trust_metrics
from .crops import CropFormat, from_model_images, to_model_images
from .sage_config import SageConfig, model_sizes
from .sage_model import TinyVAE, build_model
from .telemetry import finite_or_none
from .tinyvae_plugin import LatentRefiner

_MISSING: Any = object()


class TinyVAEIRP:
    """SAGE's TinyVAE IRP plugin backed by an hrm-vision model (see the module docstring).

    Args:
        config: SAGE-style dict (see :class:`SageConfig`); ``None`` for the defaults.

    Raises:
        ValueError: a bad or unknown key (the message names it), a size kwarg that disagrees
            with the checkpoint, an unavailable device. ``CheckpointError`` (a ``ValueError``)
            for an unloadable checkpoint.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        settings = SageConfig.from_dict(config or {})
        self.device = settings.torch_device()
        if settings.checkpoint is None:
            sizes = model_sizes(settings, None)
            warnings.warn("create_tinyvae_irp without a checkpoint: an untrained compact "
                          "student (a whole-crop DCT); pass checkpoint='compact_best.pth' for "
                          "trained weights", UserWarning, stacklevel=3)
            model = build_model(sizes.latent_dim, sizes.input_channels, sizes.img_size)
        else:
            model = load(settings.checkpoint, role="student")
            sizes = model_sizes(settings, model)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.settings = settings
        self.config: dict[str, Any] = settings.as_sage_dict(sizes)
        self.entity_id = settings.entity_id
        self.trust_weight = settings.trust_weight
        self.energy_history: list[float] = []
        self.time_history: list[float] = []
        self.latent_dim, self.input_channels, self.img_size = sizes
        self.beta_kl = settings.beta_kl
        self.use_fp16 = settings.use_fp16 and self.device.type == "cuda"
        if settings.use_fp16 and not self.use_fp16:
            warnings.warn("use_fp16=True is a no-op on the CPU (autocast to float16 runs on CUDA "
                          "only); the model runs in float32", UserWarning, stacklevel=3)
        self.crop_format = CropFormat(settings.value_range, settings.channel_order,
                                      sizes.input_channels, getattr(model, "in_channels", 3),
                                      sizes.img_size, settings.resize)
        self.refiner = LatentRefiner(self.model, settings.step_size, settings.max_backtracks,
                                     settings.prior_weight, settings.latent_bound)
        self._last_error: str | None = None
        with torch.no_grad(), self._autocast():
            probe = torch.zeros(1, self.crop_format.model_channels, self.img_size, self.img_size,
                                device=self.device)
            self.latent_shape: tuple[int, ...] = tuple(self.model.encode(probe).shape[1:])

    # ------------------------------------------------------------------ inputs and models
    def _autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.use_fp16)

    def images(self, x: Any) -> Tensor:
        """``x`` as the model's images ``(B, C, img_size, img_size)`` in [0, 1] on the device
        (see :func:`hrm_vision.irp.crops.to_model_images`)."""
        return to_model_images(x, self.crop_format, self.device)

    def encode_batch(self, batch: Any, flat: bool = False) -> Tensor:
        """The encoder's mean for crops ``batch``: ``(B, *latent_shape)``, or ``(B, N)`` with
        ``flat=True`` (the vector view for similarity search and tags)."""
        with torch.no_grad(), self._autocast():
            mu = self.model.encode(self.images(batch)).float()
        return mu.flatten(1) if flat else mu

    def get_latents(self, x: Any, flat: bool = False) -> Tensor:
        """:meth:`encode_batch` (SAGE's name for it)."""
        return self.encode_batch(x, flat)

    def decode_batch(self, latents: Any) -> Tensor:
        """Reconstructions of ``latents`` (as :meth:`refine` or :meth:`encode_batch` return them,
        flat or not, torch or numpy), in the caller's convention: ``input_channels``,
        ``channel_order`` and ``value_range`` of the config, ``(B, C, img_size, img_size)``."""
        z = torch.as_tensor(latents, dtype=torch.float32, device=self.device)
        if z.dim() == 1:
            z = z[None]
        z = z.reshape(z.shape[0], *self.latent_shape)
        with torch.no_grad(), self._autocast():
            images = self.model.decode(z).float()
        return from_model_images(images, self.crop_format)

    # ------------------------------------------------------------------ IRP primitives
    def init_state(self, x0: Any, task_ctx: dict[str, Any] | None = None) -> IRPState:
        """The encoder's mean for crops ``x0`` (``step_idx`` 0, energy set)."""
        try:
            target = self.images(x0)
        except ValueError as exc:  # remembered: SAGE's router swallows it (see halt)
            self._last_error = str(exc)
            raise
        self._last_error = None
        with self._autocast():
            mu, meta = self.refiner.start(target)
        with torch.no_grad(), self._autocast():
            meta["logvar"] = self.model.posterior(target).logvar.float()
        return IRPState(mu, 0, float(meta["energies"].mean()), meta)

    def energy(self, state: IRPState) -> float:
        """Batch-mean energy (lower is better): per crop, MSE of the decoded latent against the
        crop (model images in [0, 1]) plus ``prior_weight * 0.5 * mean(z**2)``."""
        meta = self._meta(state)
        with torch.no_grad(), self._autocast():
            return float(self.refiner.energies(state.x, meta["target"]).mean())

    def step(self, state: IRPState, noise_schedule: Any = None) -> IRPState:
        """One backtracking gradient step per crop; no crop's energy rises."""
        if noise_schedule is not None:
            raise ValueError("this plugin refines deterministically; noise_schedule must be None")
        with self._autocast():
            z, meta = self.refiner.step(state.x, self._meta(state))
        return IRPState(z, state.step_idx + 1, float(meta["energies"].mean()), meta)

    def project(self, state: IRPState) -> IRPState:
        """The identity: :meth:`step` keeps latents in range itself."""
        return state

    def _meta(self, state: IRPState) -> dict[str, Any]:
        meta = getattr(state, "meta", None)
        if not isinstance(meta, dict) or "target" not in meta:
            why = f"; init_state failed: {self._last_error}" if self._last_error else ""
            raise ValueError(f"the state was not made by this plugin's init_state{why}")
        return meta

    # ------------------------------------------------------------------ halting
    def _live(self) -> tuple[int, float, int]:
        """``max_iterations``, ``halt_eps``, ``halt_K`` as they are in ``self.config`` now."""
        return SageConfig.live_halting(self.config)

    def halt_reason(self, history: Sequence[IRPState], early_stop: bool = True,
                    max_steps: int | None = None) -> str | None:
        """``"max_steps"`` once ``max_iterations`` (or ``max_steps``) states exist;
        ``"slope<eps"`` when the energy fell by at most ``halt_eps * |E0|`` per step, on
        average, over the last ``halt_K`` steps (``E0`` the first energy: ``halt_eps`` is
        relative); ``None`` to go on."""
        max_iterations, eps, k = self._live()
        if len(history) >= (max_steps or max_iterations):
            return "max_steps"
        energies = [float(self._energy_of(s)) for s in history]
        if early_stop and len(energies) > k and \
                (energies[-1 - k] - energies[-1]) / k <= eps * abs(energies[0]):
            return "slope<eps"
        return None

    def halt(self, history: Sequence[IRPState]) -> bool:
        """True when :meth:`halt_reason` gives a reason to stop."""
        for state in history:
            self._meta(state)  # a fallback state SAGE made after init_state failed is an error
        return self.halt_reason(history) is not None

    def get_halt_reason(self, history: Sequence[IRPState]) -> str:
        """:meth:`halt_reason`, ``"unknown"`` while the run may go on (SAGE's names)."""
        return (self.halt_reason(history) or "unknown") if history else "no_history"

    def _energy_of(self, state: IRPState) -> float:
        return state.energy_val if state.energy_val is not None else self.energy(state)

    # ------------------------------------------------------------------ runs
    def refine(self, x: Any, task_ctx: Any = _MISSING, max_steps: int | None = None,
               *, early_stop: Any = _MISSING) -> tuple[Any, Any]:
        """SAGE's two conventions (see the module docstring): a dict or ``None`` as second
        argument (or ``task_ctx=``) runs :meth:`refine_states`; none, or a bool (or
        ``early_stop=``), runs :meth:`refine_latent`."""
        if early_stop is not _MISSING or task_ctx is _MISSING or isinstance(task_ctx, bool):
            stop = early_stop if early_stop is not _MISSING else task_ctx
            return self.refine_latent(x, True if stop is _MISSING else bool(stop), max_steps)
        if task_ctx is not None and not isinstance(task_ctx, dict):
            raise ValueError(f"refine's second argument is task_ctx (a dict) or early_stop (a "
                             f"bool), got {type(task_ctx).__name__}")
        return self.refine_states(x, task_ctx, max_steps)

    def refine_states(self, x: Any, task_ctx: dict[str, Any] | None = None,
                      max_steps: int | None = None, early_stop: bool = True
                      ) -> tuple[IRPState, list[IRPState]]:
        """Refine crops ``x`` until :meth:`halt_reason`: ``(final_state, history)``.

        ``max_steps`` (default ``config['max_iterations']``) counts states, the encoder's
        guess included.
        """
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (the encoder's guess), got {max_steps}")
        state = self.init_state(x, task_ctx)
        history = [state]
        while self.halt_reason(history, early_stop, max_steps) is None:
            state = self.step(state)
            history.append(state)
        return state, history

    def refine_latent(self, x: Any, early_stop: bool = True,
                      max_steps: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Refine crops ``x``: ``(latent (B, *latent_shape), telemetry)``; with
        ``early_stop=False`` the run uses all ``max_iterations`` states.

        Telemetry (JSON-safe): ``iterations`` (states computed, the encoder pass counts 1),
        ``max_iterations``, ``early_stopped``, ``converged``, ``compute_saved``,
        ``energy_trajectory``, ``energy_delta`` (final minus first), ``halt_reason``, ``trust``
        (R² of the reconstruction, clipped to [0, 1]), ``reconstruction_error`` (MSE on the
        model's [0, 1] images), ``psnr_db``, ``kl_divergence`` (per latent element),
        ``latent_dim``, ``latent_norm``, ``time_ms``, ``beta_kl``, ``entity_id``.
        """
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        state, history = self.refine_states(x, None, max_steps, early_stop)
        meta, z = state.meta, state.x
        with torch.no_grad(), self._autocast():
            recon = self.model.decode(z).float()
        if cuda:
            torch.cuda.synchronize(self.device)
        time_ms = (time.perf_counter() - start) * 1000.0
        target = meta["target"]
        sq_err = float((recon - target).pow(2).sum())
        spread = float((target - target.mean((1, 2, 3), keepdim=True)).pow(2).sum())
        mse = sq_err / target.numel()
        logvar = meta["logvar"]
        kl = float((0.5 * (z.float().pow(2) + logvar.exp() - logvar - 1)).mean())
        energies = [float(s.energy_val) for s in history]
        max_iterations = max_steps or self._live()[0]
        reason = self.halt_reason(history, early_stop, max_steps) or "max_steps"
        telemetry = {
            "entity_id": self.entity_id,
            "iterations": len(history),
            "max_iterations": max_iterations,
            "early_stopped": reason != "max_steps",
            "converged": reason == "slope<eps",
            "compute_saved": 1.0 - len(history) / max_iterations,
            "energy_trajectory": [finite_or_none(e) for e in energies],
            "energy_delta": finite_or_none(energies[-1] - energies[0]),
            "halt_reason": reason,
            "trust": 1.0 if spread == 0 and sq_err == 0 else
            min(1.0, max(0.0, 1.0 - sq_err / spread)) if spread > 0 else 0.0,
            "reconstruction_error": finite_or_none(mse),
            "psnr_db": finite_or_none(10 * np.log10(1.0 / mse)) if mse > 0 else None,
            "kl_divergence": finite_or_none(kl),
            "latent_dim": self.latent_dim,
            "latent_norm": finite_or_none(float(z.float().norm())),
            "time_ms": finite_or_none(time_ms),
            "beta_kl": self.beta_kl,
        }
        return z.float(), telemetry

    # ------------------------------------------------------------------ reporting
    def compute_trust_metrics(self, history: Sequence[IRPState]) -> dict[str, float]:
        """SAGE's trust keys: ``monotonicity_ratio`` (share of steps whose energy did not rise;
        1.0 with no step), ``dE_variance`` (variance of the energy changes) and
        ``convergence_rate`` (mean decrease per step relative to the first energy)."""
        trust = trust_metrics([float(self._energy_of(s)) for s in history])
        return {"monotonicity_ratio": finite_or_none(trust.monotonicity) or 0.0,
                "dE_variance": finite_or_none(trust.energy_change_variance) or 0.0,
                "convergence_rate": finite_or_none(trust.convergence_rate) or 0.0}

    def emit_telemetry(self, state: IRPState, history: Sequence[IRPState]) -> dict[str, Any]:
        """SAGE's telemetry record of a run (JSON-safe): ``entity_id``, ``plugin``, ``step_idx``,
        ``E``, ``dE``, ``steps``, ``halt_reason``, ``trust`` (see
        :meth:`compute_trust_metrics`), ``budget`` (``ATP_spent``, ``time_ms``, ``memory_mb``),
        ``LRC_context``, plus ``energy_trajectory``."""
        energies = [finite_or_none(self._energy_of(s)) for s in history] or \
            [finite_or_none(self._energy_of(state))]
        d_e = energies[-1] - energies[-2] if len(energies) > 1 and None not in energies[-2:] \
            else None
        elapsed = (state.timestamp - history[0].timestamp) * 1000.0 if history else 0.0
        return {
            "entity_id": self.entity_id,
            "plugin": "tinyvae",
            "step_idx": state.step_idx,
            "E": energies[-1],
            "dE": finite_or_none(d_e) if d_e is not None else None,
            "steps": len(history),
            "halt_reason": self.halt_reason(history) if history else None,
            "trust": self.compute_trust_metrics(history or [state]),
            "budget": {"ATP_spent": len(history) * float(self.config.get("ATP_per_step", 0.1)),
                       "time_ms": finite_or_none(elapsed) or 0.0, "memory_mb": 0.0},
            "LRC_context": self.config.get("LRC_context"),
            "energy_trajectory": energies,
        }

    def get_semantic_representation(self, state: IRPState) -> dict[str, Any]:
        """What SAGE's orchestrator keeps of the vision slot: ``latent`` (numpy
        ``(B, *latent_shape)``), ``latent_flat`` ``(B, N)``, ``reconstruction`` (numpy, the
        caller's convention, see :meth:`decode_batch`), ``energy``, ``refinement_steps``."""
        z = state.x.detach().float()
        return {"latent": z.cpu().numpy(), "latent_flat": z.flatten(1).cpu().numpy(),
                "reconstruction": self.decode_batch(z).cpu().numpy(),
                "energy": finite_or_none(self._energy_of(state)),
                "refinement_steps": state.step_idx}


@cache
def _plugin_class() -> type[TinyVAEIRP]:
    """:class:`TinyVAEIRP`, also subclassing ``sage.irp.base.IRPPlugin`` when SAGE imports."""
    try:  # SAGE is the framework calling the plugin, found on its path: not a dependency
        sage_irp_plugin = importlib.import_module("sage.irp.base").IRPPlugin
    except ModuleNotFoundError as exc:
        if exc.name != "sage" and not (exc.name or "").startswith("sage."):
            warnings.warn(f"sage is on the path but does not import ({exc}); the plugin is not "
                          "a sage.irp.base.IRPPlugin", UserWarning, stacklevel=3)
        return TinyVAEIRP
    except ImportError as exc:
        warnings.warn(f"sage is on the path but does not import ({exc}); the plugin is not a "
                      "sage.irp.base.IRPPlugin", UserWarning, stacklevel=3)
        return TinyVAEIRP
    return type("TinyVAEIRP", (TinyVAEIRP, sage_irp_plugin), {"__module__": __name__})


def create_tinyvae_irp(device: str | torch.device | None = None, **kwargs: Any) -> TinyVAEIRP:
    """SAGE's factory: a :class:`TinyVAEIRP` from keyword arguments (see :class:`SageConfig`).

    ``device`` defaults to CUDA when available, else the CPU (``"jetson"`` means CUDA).
    """
    config = dict(kwargs) if device is None else {"device": device, **kwargs}
    return _plugin_class()(config)


__all__ = ["TinyVAE", "TinyVAEIRP", "create_tinyvae_irp"]
