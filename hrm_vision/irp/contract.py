"""The IRP contract: state, plugin base, config, trust metrics, telemetry records and their
schema (``telemetry.schema.json``), the host's guards, hook markers."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, ClassVar, NamedTuple, NoReturn, TypeVar

import pluggy
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..io import describe_validation_error

PROJECT_NAME = "hrm_vision"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
SCHEMA_VERSION = 2  # of the record layout; 2: error records


@hookspec
def register_irp_plugins(register: Callable[..., Any]) -> None:
    """Call ``register(name, factory, config_model, kind="perception", description="")`` once
    per plugin: ``factory`` takes the validated ``config_model`` (an :class:`IRPConfig` subclass)
    and returns an :class:`IRPPlugin`. The hook may run more than once: load weights in the
    factory."""


@dataclass
class IRPState:
    """One estimate: ``step_idx`` 0 is the initial guess, ``energy_val`` is ``None`` until
    computed, ``meta`` is plugin-private (not in telemetry)."""

    x: Any
    step_idx: int = 0
    energy_val: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)


class IRPConfig(BaseModel):
    """Settings every plugin has; a plugin's config extends it. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(20, ge=1, description="states per run, the initial guess included")
    halt_eps: float = Field(0.0, ge=0.0, description="halt at a mean decrease per step <= this")
    halt_window: int = Field(3, ge=1, description="K, the number of steps the slope is taken over")


class PluginConfigError(ValueError):
    """A config its pydantic model rejects; the message names each bad field."""


Config = TypeVar("Config", bound=BaseModel)


def validate_config(model: type[Config], config: Any, what: str) -> Config:
    """``config`` (dict, model or ``None``) validated, else a :class:`PluginConfigError`
    ``"WHAT: field: problem; unknown key 'x' (known keys: ...)"``."""
    if isinstance(config, model):
        return config
    try:
        return model.model_validate(config.model_dump() if isinstance(config, BaseModel)
                                    else config or {})
    except ValidationError as exc:
        problems = describe_validation_error(exc, known=model.model_fields)
        raise PluginConfigError(f"{what}: {problems}") from exc


class TrustMetrics(NamedTuple):
    """From an energy trajectory: ``monotonicity`` (share of updates that did not raise it, 1.0
    with none), ``energy_change_variance`` (0.0 with < 2 updates), ``convergence_rate``
    (``(E0 - E_last) / (|E0| * updates)``, 0.0 with no update or ``E0 == 0``)."""

    monotonicity: float
    energy_change_variance: float
    convergence_rate: float


def trust_metrics(energies: Sequence[float]) -> TrustMetrics:
    """Trust metrics of an energy trajectory ``[E0, E1, ...]``."""
    diffs = [b - a for a, b in zip(energies[:-1], energies[1:], strict=True)]
    if not diffs:
        return TrustMetrics(1.0, 0.0, 0.0)
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / len(diffs)
    e0 = energies[0]
    rate = (e0 - energies[-1]) / (abs(e0) * len(diffs)) if e0 != 0 else 0.0
    return TrustMetrics(sum(d <= 0 for d in diffs) / len(diffs), variance, rate)


class IRPResult(NamedTuple):
    state: IRPState
    history: list[IRPState]
    telemetry: dict[str, Any]


class IRPPlugin:
    """Base of IRP plugins: subclasses implement ``init_state`` (the first guess), ``energy``
    (lower is better, 0.0 valid) and ``step`` (a projected state, ``energy_val`` set, not above
    its input's). ``max_steps`` counts states, the initial guess included."""

    name: ClassVar[str] = "irp"  # written into telemetry
    kind: ClassVar[str] = "generic"

    def __init__(self, config: IRPConfig) -> None:
        self.config = config

    def init_state(self, x0: Any, task_ctx: dict[str, Any]) -> IRPState:
        raise NotImplementedError

    def energy(self, state: IRPState) -> float:
        raise NotImplementedError

    def step(self, state: IRPState) -> IRPState:
        raise NotImplementedError

    def project(self, state: IRPState) -> IRPState:
        return state

    def halt_reason(self, history: Sequence[IRPState], max_steps: int | None = None) -> str | None:
        """``"max_steps"``, ``"converged"`` (the energy fell by at most ``halt_eps`` per step,
        on average, over the last ``halt_window`` steps) or ``None``."""
        if len(history) >= (self.config.max_steps if max_steps is None else max_steps):
            return "max_steps"
        k = self.config.halt_window
        if len(history) > k:
            first, last = history[-1 - k].energy_val, history[-1].energy_val
            if first is not None and last is not None \
                    and (first - last) / k <= self.config.halt_eps:
                return "converged"
        return None

    def halt(self, history: Sequence[IRPState], max_steps: int | None = None) -> bool:
        return self.halt_reason(history, max_steps) is not None

    def refine(self, x0: Any, task_ctx: dict[str, Any] | None = None,
               max_steps: int | None = None) -> tuple[IRPState, list[IRPState]]:
        """``(final_state, history)``; ``init_state`` gets a copy of ``task_ctx``."""
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (the initial guess), got {max_steps}")
        state = self.init_state(x0, dict(task_ctx or {}))
        history = [state]
        while True:
            if state.energy_val is None:
                state.energy_val = self.energy(state)
            if self.halt(history, max_steps):
                return state, history
            state = self.step(state)
            history.append(state)

    def emit_telemetry(self, history: Sequence[IRPState], *, time_ms: float,
                       max_steps: int | None = None, batch_size: int = 1,
                       input_id: str | int | None = None) -> dict[str, Any]:
        """The run record of ``history`` (non-finite energies: ``null``, trust metrics 0.0)."""
        if not history or any(s.energy_val is None for s in history):
            raise ValueError("emit_telemetry needs a non-empty history; a state with no energy "
                             "needs plugin.energy(state) first")
        trajectory = [finite_or_none(s.energy_val) for s in history]
        trust = trust_metrics(trajectory) if None not in trajectory \
            else TrustMetrics(0.0, 0.0, 0.0)  # type: ignore[arg-type]
        return {
            "schema_version": SCHEMA_VERSION, "plugin": self.name, "kind": self.kind,
            "steps": len(history) - 1,
            "max_steps": self.config.max_steps if max_steps is None else max_steps,
            "batch_size": batch_size, "energy_trajectory": trajectory,
            "energy_initial": trajectory[0], "energy_final": trajectory[-1],
            "halt_reason": self.halt_reason(history, max_steps) or "stopped",
            "time_ms": finite_or_none(time_ms) or 0.0,
            "trust": {k: finite_or_none(v) or 0.0 for k, v in trust._asdict().items()},
            "timestamp": history[-1].timestamp,
            **({} if input_id is None else {"input_id": input_id})}

    def run(self, x0: Any, task_ctx: dict[str, Any] | None = None,
            max_steps: int | None = None, input_id: str | int | None = None) -> IRPResult:
        """:meth:`refine` timed, with its telemetry: what a host calls."""
        start = time.perf_counter()
        state, history = self.refine(x0, task_ctx, max_steps)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        return IRPResult(state, history, self.emit_telemetry(
            history, time_ms=elapsed_ms, max_steps=max_steps,
            batch_size=history[0].meta.get("batch_size", 1), input_id=input_id))


def finite_or_none(value: float | None) -> float | None:
    """``float(value)`` when finite, else ``None`` (JSON-safe)."""
    return float(value) if value is not None and math.isfinite(value) else None


@cache
def telemetry_schema() -> dict[str, Any]:
    """The telemetry JSON schema (Draft 2020-12), read from the installed package."""
    schema = resources.files(__package__).joinpath("telemetry.schema.json")
    return json.loads(schema.read_text("utf-8"))


def validate_telemetry(record: dict[str, Any]) -> None:
    """A ``ValueError`` naming the field if ``record`` breaks the schema or is not JSON-safe."""
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"telemetry is not JSON-safe: {exc}") from exc
    import jsonschema

    validator = jsonschema.Draft202012Validator(telemetry_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(record))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "<record>"
        raise ValueError(f"telemetry field {where}: {error.message}")


@dataclass(frozen=True)
class PluginError:
    """A reported plugin failure (docs/irp.md, "When a plugin fails")."""

    name: str
    source: str
    message: str
    stage: str = "import"  # "register", "factory" or "run"
    input_id: int | str | None = None


def error_record(error: PluginError, error_type: str) -> dict[str, Any]:
    """The telemetry record of ``error``, an exception of class ``error_type``."""
    return {"schema_version": SCHEMA_VERSION, "plugin": error.name, "timestamp": time.time(),
            "source": error.source, "error": {"stage": error.stage, "type": error_type,
                                              "message": " ".join(error.message.split())},
            **({} if error.input_id is None else {"input_id": error.input_id})}


def to_jsonl(record: dict[str, Any]) -> str:
    """``record`` validated, as one JSON line (with its newline)."""
    validate_telemetry(record)
    return json.dumps(record, allow_nan=False, sort_keys=True) + "\n"


def private_copy(x: Any) -> Any:
    """A copy of input ``x`` for one plugin: its in-place changes reach no one else."""
    import torch

    return x.detach().clone() if isinstance(x, torch.Tensor) else copy.deepcopy(x)


class HardExitError(SystemExit):
    """A plugin called ``os._exit(status)`` while the host ran it (see :func:`os_exit_raises`)."""


@contextlib.contextmanager
def os_exit_raises() -> Iterator[None]:
    """Inside, ``os._exit(status)`` in this process raises :class:`HardExitError` (a forked
    child's still ends it). Not caught: ``posix._exit``, an ``_exit`` bound before, signals."""
    real, pid = os._exit, os.getpid()

    def _exit(status: int) -> NoReturn:
        if os.getpid() != pid:
            real(status)
        raise HardExitError(f"the plugin called os._exit({status}); the host stopped it")

    os._exit = _exit
    try:
        yield
    finally:
        os._exit = real
