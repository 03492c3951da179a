"""The training state of one phase and the checkpoint that carries it, typed.

:class:`TrainState` is the loop's position and bookkeeping (epoch, batch, optimizer steps, best
validation PSNR, running sums, skipped steps); :class:`TrainingCheckpoint` is everything a
``*_last.pth`` holds to resume exactly: the phase's models, the state, optimizer, scheduler, AMP
scaler, RNG states, history and config. Both convert to and from the plain dict a checkpoint file
holds (``to_payload``/``from_payload``), so files load under ``weights_only=True``.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..io import CheckpointError

#: Validation metric that picks the best epoch of a phase: an epoch is the best so far when its
#: value is strictly greater than the best before it (``value > best``: the earliest of equal
#: epochs stays best; NaN never is).
BEST_METRIC = "psnr"


@dataclass
class TrainState:
    """Where a phase stands.

    ``epoch``: completed epochs (during an epoch, its 0-based index); ``step_in_epoch``: batches
    of the current epoch already done; ``global_step``: optimizer steps; ``best``: the best
    validation ``BEST_METRIC`` so far; ``running``/``count``: sample-weighted sums of the training
    terms in the current epoch and the samples behind them; ``time_s``: training seconds of the
    current epoch before an interruption; ``bad_steps``: non-finite steps skipped or undone in
    this phase; ``good_steps``: optimizer steps kept in the current epoch.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_psnr: float = -math.inf
    running: dict[str, float] = field(default_factory=dict)
    count: int = 0
    time_s: float = 0.0
    bad_steps: int = 0
    good_steps: int = 0

    def add(self, terms: dict[str, float], samples: int) -> None:
        """Add one batch's mean terms, weighted by its ``samples``."""
        for k, v in terms.items():
            self.running[k] = self.running.get(k, 0.0) + v * samples
        self.count += samples

    def means(self) -> dict[str, float]:
        """The mean of each training term over this epoch's samples so far."""
        return {k: v / max(self.count, 1) for k, v in self.running.items()}

    def reset_epoch(self) -> None:
        """Forget the running sums (at the start of an epoch not resumed mid-way)."""
        self.running, self.count, self.time_s, self.good_steps = {}, 0, 0.0, 0

    def finish_epoch(self) -> None:
        """Move to the start of the next epoch."""
        self.epoch += 1
        self.step_in_epoch = 0
        self.reset_epoch()

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> TrainState:
        """The state stored in a checkpoint dict; absent keys keep their defaults (a checkpoint
        without ``good_steps`` counts the batches it did as kept)."""
        values = {f.name: payload[f.name] for f in fields(cls) if f.name in payload}
        values.setdefault("good_steps", values.get("step_in_epoch", 0))
        return cls(**values)


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), NumPy and Python RNG states as tensors, lists and numbers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: Payload keys of a training checkpoint besides the models and the state's fields.
TRAINING_KEYS = ("phase", "history", "config", "optimizer_state_dict", "scheduler_state_dict",
                 "scaler_state_dict", "rng_state")


@dataclass
class TrainingCheckpoint:
    """A resumable checkpoint of one phase (``*_last.pth``, ``*_best.pth``).

    ``models`` holds the phase's model entries (``student_state_dict``/``student_arch``, the
    adapter, ...), written at the top level of the payload next to the other keys.
    """

    phase: str
    models: dict[str, Any]
    state: TrainState
    history: list[dict[str, Any]]
    config: dict[str, Any]
    optimizer_state_dict: dict[str, Any]
    scheduler_state_dict: dict[str, Any]
    scaler_state_dict: dict[str, Any]
    rng_state: dict[str, Any]

    def to_payload(self) -> dict[str, Any]:
        """The plain dict saved with :func:`hrm_vision.io.save_checkpoint`."""
        return {"phase": self.phase, **self.models, **self.state.to_payload(),
                "history": self.history, "config": self.config,
                "optimizer_state_dict": self.optimizer_state_dict,
                "scheduler_state_dict": self.scheduler_state_dict,
                "scaler_state_dict": self.scaler_state_dict, "rng_state": self.rng_state}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str = "checkpoint"
                     ) -> TrainingCheckpoint:
        """Parse a loaded checkpoint dict; a ``CheckpointError`` names the keys it lacks and
        every key whose value has the wrong type (:func:`check_training_payload`)."""
        missing = [k for k in TRAINING_KEYS if k not in payload]
        if missing:
            raise CheckpointError(f"{source} is not a complete training checkpoint: it lacks "
                                  f"{', '.join(missing)}")
        check_training_payload(payload, source)
        skip = {*TRAINING_KEYS, "format_version", *(f.name for f in fields(TrainState))}
        return cls(phase=payload["phase"],
                   models={k: v for k, v in payload.items() if k not in skip},
                   state=TrainState.from_payload(payload),
                   history=list(payload["history"]), config=payload["config"],
                   optimizer_state_dict=payload["optimizer_state_dict"],
                   scheduler_state_dict=payload["scheduler_state_dict"],
                   scaler_state_dict=payload["scaler_state_dict"],
                   rng_state=payload["rng_state"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _check_rng(state: Any) -> str | None:
    """What is wrong with a stored :func:`rng_state`, or None."""
    if not isinstance(state, dict):
        return "a dict"
    torch_state = state.get("torch")
    if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8:
        return "a dict whose 'torch' entry is a uint8 tensor"
    numpy_state = state.get("numpy")
    if not (isinstance(numpy_state, (list, tuple)) and len(numpy_state) == 5
            and isinstance(numpy_state[0], str) and isinstance(numpy_state[1], torch.Tensor)
            and all(_is_int(v) for v in numpy_state[2:4]) and _is_real(numpy_state[4])):
        return "a dict whose 'numpy' entry is [name, tensor, int, int, float]"
    python_state = state.get("python")
    if not (isinstance(python_state, (list, tuple)) and len(python_state) == 3
            and _is_int(python_state[0]) and isinstance(python_state[1], (list, tuple))
            and all(_is_int(v) for v in python_state[1])
            and (python_state[2] is None or _is_real(python_state[2]))):
        return "a dict whose 'python' entry is [version, list of ints, float or None]"
    cuda = state.get("cuda", [])
    if not (isinstance(cuda, (list, tuple)) and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)):
        return "a dict whose 'cuda' entry is a list of uint8 tensors"
    return None


def check_training_payload(payload: dict[str, Any], source: str = "checkpoint") -> None:
    """Check the type of every key the trainer reads from a training checkpoint (those that are
    present: :meth:`TrainingCheckpoint.from_payload` requires them); a ``CheckpointError``
    names the key, what it must be and what it holds.

    The models' tensors are checked where they are loaded
    (:func:`hrm_vision.io.load_state_checked`).
    """
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{source}: {key} must be {what}, got {_describe(payload[key])}")

    def wrong(key: str, ok: Any) -> bool:
        return key in payload and not ok(payload[key])

    if wrong("phase", lambda v: isinstance(v, str)):
        raise bad("phase", "a phase name")
    for f in fields(TrainState):
        if f.name not in payload:
            continue
        value = payload[f.name]
        if f.name == "running":
            if not (isinstance(value, dict) and all(
                    isinstance(k, str) and _is_real(v) for k, v in value.items())):
                raise bad(f.name, "a dict of loss names to numbers")
        elif f.name == "best_psnr":
            if not _is_real(value):
                raise bad(f.name, "a number")
        elif f.name == "time_s":
            if not (_is_real(value) and math.isfinite(value) and value >= 0):
                raise bad(f.name, "a finite number >= 0")
        elif not (_is_int(value) and value >= 0):
            raise bad(f.name, "an integer >= 0")
    if wrong("history", lambda h: isinstance(h, list) and all(
            isinstance(r, dict) and isinstance(r.get("phase"), str) and _is_int(r.get("epoch"))
            and isinstance(r.get("train"), dict) and isinstance(r.get("val"), dict)
            for r in h)):
        raise bad("history", "a list of epoch records (dicts with phase, epoch, train, val)")
    if wrong("config", lambda v: isinstance(v, dict)):
        raise bad("config", "a dict")
    if wrong("optimizer_state_dict", lambda v: isinstance(v, dict) and isinstance(
            v.get("state"), dict) and isinstance(v.get("param_groups"), list)):
        raise bad("optimizer_state_dict", "an optimizer state dict (state, param_groups)")
    for key in ("scheduler_state_dict", "scaler_state_dict"):
        if wrong(key, lambda v: isinstance(v, dict)):
            raise bad(key, "a dict")
    problem = _check_rng(payload["rng_state"]) if "rng_state" in payload else None
    if problem:
        raise bad("rng_state", problem)


class LastGoodState:
    """A copy of ``module``'s parameters and buffers and of ``optimizer``'s per-parameter state,
    to undo an optimizer step that made any of them non-finite.

    The copies live in buffers on the tensors' own devices, allocated once and refreshed in
    place by :meth:`save` (a device-side copy, no host transfer); :meth:`restore` copies them
    back and drops optimizer state that did not exist at :meth:`save` (the first step creates
    AdamW's moments). :meth:`all_finite` checks the same tensors with one host sync.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer
        self._module_copy: list[Tensor] = []
        self._optim_copy: dict[int, dict[str, Any]] = {}

    def _module_tensors(self) -> list[Tensor]:
        return [t for t in (*self.module.parameters(), *self.module.buffers())
                if t.is_floating_point()]

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def save(self) -> None:
        """Remember the current state as the last good one."""
        live = self._module_tensors()
        if len(self._module_copy) != len(live) or any(
                c.shape != t.shape or c.dtype != t.dtype or c.device != t.device
                for c, t in zip(self._module_copy, live, strict=True)):
            self._module_copy = [t.detach().clone() for t in live]
        else:
            torch._foreach_copy_(self._module_copy, [t.detach() for t in live])
        saved: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(self._params()):
            state = self.optimizer.state.get(p)
            if not state:
                continue
            old = self._optim_copy.get(i, {})
            entry: dict[str, Any] = {}
            for key, value in state.items():
                if isinstance(value, Tensor):
                    copy = old.get(key)
                    if (isinstance(copy, Tensor) and copy.shape == value.shape
                            and copy.dtype == value.dtype and copy.device == value.device):
                        copy.copy_(value)
                    else:
                        copy = value.detach().clone()
                    entry[key] = copy
                else:
                    entry[key] = value
            saved[i] = entry
        self._optim_copy = saved

    @torch.no_grad()
    def restore(self) -> None:
        """Put the state of the last :meth:`save` back."""
        live = self._module_tensors()
        torch._foreach_copy_([t.detach() for t in live], self._module_copy)
        for i, p in enumerate(self._params()):
            entry = self._optim_copy.get(i)
            if entry is None:
                self.optimizer.state.pop(p, None)
                continue
            state = self.optimizer.state[p]
            for key in [k for k in state if k not in entry]:
                del state[key]
            for key, value in entry.items():
                current = state.get(key)
                if not isinstance(value, Tensor):
                    state[key] = value
                elif isinstance(current, Tensor) and current.shape == value.shape:
                    current.copy_(value)
                else:
                    state[key] = value.clone()

    @torch.no_grad()
    def all_finite(self) -> bool:
        """Whether every floating-point parameter, buffer and optimizer state tensor is finite."""
        tensors = self._module_tensors() + [
            v for p in self._params() for v in self.optimizer.state.get(p, {}).values()
            if isinstance(v, Tensor) and v.is_floating_point()]
        if not tensors:
            return True
        flags = [torch.isfinite(t).all() for t in tensors]
        return bool(torch.stack([f.to(flags[0].device) for f in flags]).all().item())
