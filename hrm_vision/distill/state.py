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

from ..checkpoints import CheckpointError

#: Validation metric that picks the best epoch of a phase (higher is better).
BEST_METRIC = "psnr"


def improves(value: float, best: float) -> bool:
    """Whether a validation ``BEST_METRIC`` of ``value`` beats ``best`` (strictly: the earliest
    of equal epochs stays best; NaN never improves)."""
    return value > best


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
        """The plain dict saved with :func:`hrm_vision.checkpoints.save_checkpoint`."""
        return {"phase": self.phase, **self.models, **self.state.to_payload(),
                "history": self.history, "config": self.config,
                "optimizer_state_dict": self.optimizer_state_dict,
                "scheduler_state_dict": self.scheduler_state_dict,
                "scaler_state_dict": self.scaler_state_dict, "rng_state": self.rng_state}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str = "checkpoint"
                     ) -> TrainingCheckpoint:
        """Parse a loaded checkpoint dict; a ``CheckpointError`` names the keys it lacks."""
        missing = [k for k in TRAINING_KEYS if k not in payload]
        if missing:
            raise CheckpointError(f"{source} is not a complete training checkpoint: it lacks "
                                  f"{', '.join(missing)}")
        skip = {*TRAINING_KEYS, "format_version", *(f.name for f in fields(TrainState))}
        return cls(phase=payload["phase"],
                   models={k: v for k, v in payload.items() if k not in skip},
                   state=TrainState.from_payload(payload),
                   history=list(payload["history"]), config=payload["config"],
                   optimizer_state_dict=payload["optimizer_state_dict"],
                   scheduler_state_dict=payload["scheduler_state_dict"],
                   scaler_state_dict=payload["scaler_state_dict"],
                   rng_state=payload["rng_state"])
