"""The IRP (Iterative Refinement Primitive) contract: ``IRPState`` and the ``IRPPlugin`` base.

An IRP plugin turns an input ``x0`` into an estimate by iterative refinement:

1. ``init_state(x0, task_ctx)``: the first estimate (for a perception plugin, an amortized guess
   such as an encoder's output);
2. ``energy(state)``: how bad the estimate is, **lower is better**; any finite float, 0.0
   included, is a valid energy;
3. ``step(state)``: a new state whose energy is not higher than ``state``'s;
4. ``project(state)``: the state moved back into the valid set (e.g. a latent range);
5. ``halt(history)``: stop when ``max_steps`` states exist or the energy slope over the last
   ``halt_window`` steps is at most ``halt_eps``.

``refine(x0, task_ctx, max_steps)`` runs the loop and returns ``(final_state, history)``;
``max_steps`` counts the states in the history, the initial guess included, so ``max_steps=1``
returns the initial guess unchanged and ``max_steps=5`` makes four refinement updates.
``emit_telemetry`` turns a run into a JSON-safe dict (finite floats only; a non-finite energy is
written as ``null``) that validates against ``telemetry.schema.json`` shipped in this package
(see :mod:`hrm_vision.irp.telemetry`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from .telemetry import SCHEMA_VERSION, finite_or_none


@dataclass
class IRPState:
    """One estimate in a refinement run.

    Attributes:
        x: the current estimate (plugin-specific; a latent tensor for the TinyVAE plugin).
        step_idx: 0 for the initial guess, then 1, 2, ... for each refinement update.
        energy_val: the energy of ``x`` (lower is better), ``None`` until computed.
        meta: plugin-private data carried along the run (targets, step sizes, per-sample
            energies); it is not part of the telemetry.
        timestamp: ``time.time()`` when the state was made.
    """

    x: Any
    step_idx: int = 0
    energy_val: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)


class IRPConfig(BaseModel):
    """Refinement settings every IRP plugin has; a plugin's config model extends this class.

    Unknown keys are errors (``extra="forbid"``), so a misspelled setting names itself.
    """

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(20, ge=1, description="states per run, the initial guess included")
    halt_eps: float = Field(
        0.0, ge=0.0,
        description="halt when the mean energy decrease per step over the last halt_window "
                    "steps is at most this (0.0: halt only when the energy stops moving)")
    halt_window: int = Field(3, ge=1, description="K, the number of steps the slope is taken over")


class TrustMetrics(NamedTuple):
    """How trustworthy a refinement run looked, from its energy trajectory.

    monotonicity: share of updates whose energy did not rise, in [0, 1] (1.0 with no update).
    energy_change_variance: variance of the per-update energy changes (0.0 with < 2 updates).
    convergence_rate: mean energy decrease per update relative to the initial energy
        (``(E0 - E_last) / (|E0| * updates)``; 0.0 with no update or ``E0 == 0``).
    """

    monotonicity: float
    energy_change_variance: float
    convergence_rate: float


def trust_metrics(energies: Sequence[float]) -> TrustMetrics:
    """Trust metrics of an energy trajectory ``[E0, E1, ...]`` (one value per state)."""
    diffs = [b - a for a, b in zip(energies[:-1], energies[1:], strict=True)]
    if not diffs:
        return TrustMetrics(1.0, 0.0, 0.0)
    monotonicity = sum(d <= 0 for d in diffs) / len(diffs)
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / len(diffs) if len(diffs) > 1 else 0.0
    e0 = energies[0]
    rate = (e0 - energies[-1]) / (abs(e0) * len(diffs)) if e0 != 0 else 0.0
    return TrustMetrics(monotonicity, variance, rate)


class IRPPlugin:
    """Base class of IRP plugins: subclasses implement the four primitives.

    ``init_state``, ``energy`` and ``step`` must be implemented; ``project`` defaults to the
    identity. ``step`` must return a state that is already projected, with ``energy_val`` set and
    not higher than the input state's (a plugin that cannot guarantee this reports it through
    the ``monotonicity`` trust metric).

    Args:
        config: the plugin's validated config (an :class:`IRPConfig` subclass).
    """

    #: Registry name written into telemetry; subclasses set it.
    name: ClassVar[str] = "irp"
    #: What the plugin does ("perception", "planning", ...).
    kind: ClassVar[str] = "generic"

    def __init__(self, config: IRPConfig) -> None:
        self.config = config

    # ------------------------------------------------------------------ primitives
    def init_state(self, x0: Any, task_ctx: dict[str, Any]) -> IRPState:
        """The initial estimate for input ``x0`` (``step_idx`` 0)."""
        raise NotImplementedError

    def energy(self, state: IRPState) -> float:
        """Energy of ``state.x``: lower is better, 0.0 is a valid value."""
        raise NotImplementedError

    def step(self, state: IRPState) -> IRPState:
        """One refinement update: a projected state with ``energy_val`` set, not above ``state``'s.
        """
        raise NotImplementedError

    def project(self, state: IRPState) -> IRPState:
        """``state`` moved into the valid set; the identity unless a plugin has constraints."""
        return state

    # ------------------------------------------------------------------ halting
    def halt_reason(self, history: Sequence[IRPState], max_steps: int | None = None) -> str | None:
        """Why the run should stop now: ``"max_steps"``, ``"converged"`` or ``None`` (go on).

        ``"converged"``: the energy fell by at most ``halt_eps`` per step, on average, over the
        last ``halt_window`` steps (a rise counts as no decrease).
        """
        limit = self.config.max_steps if max_steps is None else max_steps
        if len(history) >= limit:
            return "max_steps"
        k = self.config.halt_window
        if len(history) > k:
            first, last = history[-1 - k].energy_val, history[-1].energy_val
            if first is not None and last is not None \
                    and (first - last) / k <= self.config.halt_eps:
                return "converged"
        return None

    def halt(self, history: Sequence[IRPState], max_steps: int | None = None) -> bool:
        """True when :meth:`halt_reason` gives a reason to stop."""
        return self.halt_reason(history, max_steps) is not None

    # ------------------------------------------------------------------ the loop
    def refine(self, x0: Any, task_ctx: dict[str, Any] | None = None,
               max_steps: int | None = None) -> tuple[IRPState, list[IRPState]]:
        """Refine ``x0`` until :meth:`halt`; returns ``(final_state, history)``.

        ``max_steps`` (default ``config.max_steps``) counts states, the initial guess included:
        ``max_steps=1`` returns ``init_state``'s estimate unchanged. The initial state is not
        projected (it is the plugin's own guess); every update is.
        """
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (the initial guess), got {max_steps}")
        state = self.init_state(x0, dict(task_ctx or {}))
        if state.energy_val is None:
            state.energy_val = self.energy(state)
        history = [state]
        while not self.halt(history, max_steps):
            state = self.step(state)
            if state.energy_val is None:
                state.energy_val = self.energy(state)
            history.append(state)
        return state, history

    # ------------------------------------------------------------------ reporting
    def compute_trust_metrics(self, history: Sequence[IRPState]) -> TrustMetrics:
        """Trust metrics of a run (see :class:`TrustMetrics`)."""
        return trust_metrics([_energy_of(s) for s in history])

    def emit_telemetry(self, history: Sequence[IRPState], *, time_ms: float,
                       max_steps: int | None = None, batch_size: int = 1,
                       input_id: str | int | None = None) -> dict[str, Any]:
        """A JSON-safe record of a run, valid under ``telemetry.schema.json``.

        Non-finite energies (which a broken input could produce) are written as ``null`` and
        leave the trust metrics at their neutral values, so the record always serialises with
        ``json.dumps(..., allow_nan=False)``.
        """
        if not history:
            raise ValueError("emit_telemetry needs a history with at least the initial state")
        trajectory = [finite_or_none(_energy_of(s)) for s in history]
        finite = all(e is not None for e in trajectory)
        trust = self.compute_trust_metrics(history) if finite else TrustMetrics(0.0, 0.0, 0.0)
        record: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "plugin": self.name,
            "kind": self.kind,
            "steps": len(history) - 1,
            "max_steps": self.config.max_steps if max_steps is None else max_steps,
            "batch_size": batch_size,
            "energy_trajectory": trajectory,
            "energy_initial": trajectory[0],
            "energy_final": trajectory[-1],
            "halt_reason": self.halt_reason(history, max_steps) or "stopped",
            "time_ms": finite_or_none(time_ms) or 0.0,
            "trust": {k: finite_or_none(v) or 0.0 for k, v in trust._asdict().items()},
            "timestamp": history[-1].timestamp,
        }
        if input_id is not None:
            record["input_id"] = input_id
        return record

    def run(self, x0: Any, task_ctx: dict[str, Any] | None = None,
            max_steps: int | None = None, input_id: str | int | None = None) -> IRPResult:
        """:meth:`refine` timed, with its telemetry: what a host calls."""
        start = time.perf_counter()
        state, history = self.refine(x0, task_ctx, max_steps)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        batch = history[0].meta.get("batch_size", 1)
        telemetry = self.emit_telemetry(history, time_ms=elapsed_ms, max_steps=max_steps,
                                        batch_size=batch, input_id=input_id)
        return IRPResult(state, history, telemetry)


class IRPResult(NamedTuple):
    """What :meth:`IRPPlugin.run` returns: the final state, the whole history, the telemetry."""

    state: IRPState
    history: list[IRPState]
    telemetry: dict[str, Any]


def _energy_of(state: IRPState) -> float:
    if state.energy_val is None:
        raise ValueError(f"state {state.step_idx} has no energy; call plugin.energy(state) first")
    return float(state.energy_val)


__all__ = ["IRPConfig", "IRPPlugin", "IRPResult", "IRPState", "TrustMetrics", "trust_metrics"]
