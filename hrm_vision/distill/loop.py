"""The training loop of one phase: optimizer steps, accumulation, AMP, skipped steps, signals,
validation, history records and resumable state.

:class:`PhaseLoop` owns the optimizer, schedule, scaler and :class:`TrainState` of a phase. It
knows nothing of the trainer: it reports through ``emit(hook, *args)`` (the callbacks, which also
write the checkpoints and ``history.json``), reads a stop request through ``stop_signal()`` and
appends its epoch records to the shared ``history`` list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .config import DistillConfig
from .distributed import DistContext, barrier, reduce_mean, set_epoch, wrap_ddp
from .ema import WeightAverage
from .optim import autocast, build_optimizer, build_scheduler, make_scaler, steps_per_epoch
from .phases import Phase
from .state import BEST_METRIC, TrainingCheckpoint, TrainState, improves, rng_state, set_rng_state


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state was saved to ``checkpoint`` (resume with it)."""

    def __init__(self, signame: str, checkpoint: Path | None) -> None:
        self.signame, self.checkpoint = signame, checkpoint
        where = f"; saved {checkpoint}, resume with --resume auto" if checkpoint else ""
        super().__init__(f"stopped by {signame} after the current step{where}")


class TrainingDiverged(RuntimeError):
    """The loss was non-finite ``max_bad_steps`` times in a row."""


Emit = Callable[..., None]


def _cloned(value: Any) -> Any:
    """``value`` with every tensor inside its dicts and lists cloned."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cloned(v) for v in value]
    return value


class PhaseLoop:
    """Trains ``phase`` for its epochs on ``train_loader`` (yielding ``(index, images)``).

    Args:
        phase: what trains and how it is validated.
        config: the run's config (optimisation, precision, intervals).
        ctx: the distributed context (device, rank).
        train_loader: this rank's training batches.
        history: the run's epoch records; this phase's records are replaced or appended.
        emit: ``emit(hook, *args)`` calls a callback hook (rank 0 only).
        stop_signal: the name of a pending stop signal, or None.
        out_dir: the checkpoint folder (named in errors).
    """

    def __init__(self, phase: Phase, config: DistillConfig, ctx: DistContext,
                 train_loader: DataLoader, history: list[dict[str, Any]], emit: Emit,
                 stop_signal: Callable[[], str | None], out_dir: Path) -> None:
        self.phase, self.config, self.ctx = phase, config, ctx
        self.loader, self.history, self.emit = train_loader, history, emit
        self.stop_signal, self.out_dir = stop_signal, out_dir
        self.module = phase.trainable()
        self.wrapped = wrap_ddp(self.module, ctx)
        self.optimizer = build_optimizer(phase.param_groups(), config)
        self.steps_per_epoch = steps_per_epoch(len(train_loader), config.grad_accum_steps)
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps,
                                         phase.epochs * self.steps_per_epoch)
        self.scaler = make_scaler(config, ctx.device)
        self.average = (WeightAverage(self.module, config.ema_decay)
                        if config.ema_decay > 0 else None)
        self.state = TrainState()
        self.current_epoch = 0
        self.consecutive_bad = 0
        self._started = 0.0

    # ------------------------------------------------------------------ state
    def checkpoint(self) -> TrainingCheckpoint:
        """The resumable state of this phase now: the models with the averaged weights (what
        a user loads), plus the raw training weights when an average is kept."""
        models = self.phase.model_payload() if self.average is None else {}
        if self.average is not None:
            with self.average.applied():  # clone: the payload's CPU tensors alias the module
                models = _cloned(self.phase.model_payload())
            models.update(self.average.train_payload())
        return TrainingCheckpoint(
            phase=self.phase.name, models=models, state=self.state,
            history=self.history, config=self.config.model_dump(),
            optimizer_state_dict=self.optimizer.state_dict(),
            scheduler_state_dict=self.scheduler.state_dict(),
            scaler_state_dict=self.scaler.state_dict(), rng_state=rng_state())

    def restore(self, payload: dict[str, Any], source: str) -> None:
        """Continue from a checkpoint dict of this phase: models first (a mismatch names the
        keys), then optimizer, scheduler, scaler, state, history and RNG."""
        self.phase.load_models(payload, source)
        if self.average is not None:
            self.average.restore(payload)
        saved = TrainingCheckpoint.from_payload(payload, source)
        self.optimizer.load_state_dict(saved.optimizer_state_dict)
        self.scheduler.load_state_dict(saved.scheduler_state_dict)
        if saved.scaler_state_dict:
            self.scaler.load_state_dict(saved.scaler_state_dict)
        self.state = saved.state
        self.history[:] = saved.history
        set_rng_state(saved.rng_state)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Train from the current state to the last epoch, then emit ``on_phase_end``."""
        for epoch in range(self.state.epoch, self.phase.epochs):
            self._train_epoch(epoch)
            self._finish_epoch(epoch)
        self.emit("on_phase_end", self.phase)

    def _any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is set on any rank (the same answer on every rank)."""
        return reduce_mean({"flag": float(flag)}, self.ctx, 1)["flag"] > 0.0

    def _train_epoch(self, epoch: int) -> None:
        self.current_epoch = epoch
        set_epoch(self.loader, epoch)
        self.phase.set_train_mode(epoch)
        skip = self.state.step_in_epoch
        if skip == 0:
            self.state.reset_epoch()
        self.emit("on_epoch_begin", self.phase, epoch, len(self.loader))
        self._started = time.perf_counter() - self.state.time_s
        self.optimizer.zero_grad(set_to_none=True)
        for step, (index, x) in enumerate(self.loader):
            if step < skip:
                continue
            boundary = self._train_batch(epoch, step, index, x)
            self.state.step_in_epoch = step + 1
            if boundary and self._any_rank(self.stop_signal() is not None):
                self._interrupt()

    def _train_batch(self, epoch: int, step: int, index: Tensor, x: Tensor) -> bool:
        """Forward and backward one batch (an optimizer step at the end of an accumulation
        window); returns whether this batch ended the window."""
        x = x.to(self.ctx.device, non_blocking=True)
        with autocast(self.config, self.ctx.device):
            terms = self.phase.loss(self.wrapped, index, x)
        finite = not self._any_rank(not bool(torch.isfinite(terms["total"]).item()))
        boundary = ((step + 1) % self.config.grad_accum_steps == 0
                    or step + 1 == len(self.loader))
        if not finite:
            self._skip_step(epoch, step)
            return boundary
        self.consecutive_bad = 0
        self.scaler.scale(terms["total"] / self.config.grad_accum_steps).backward()
        if boundary:
            self._optimizer_step()
        values = {k: float(v.detach()) for k, v in terms.items()}
        self.state.add(values, x.shape[0])
        self.emit("on_batch_end", self.phase, step, values)
        if (step + 1) % self.config.log_interval == 0:
            self.emit("on_log", self.phase, step + 1, values)
        return boundary

    def _optimizer_step(self) -> None:
        for p in self.phase.frozen_parameters(self.current_epoch):
            p.grad = None  # AdamW leaves parameters without a gradient untouched
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.average is not None:
            self.average.update()
        self.state.global_step += 1

    def _skip_step(self, epoch: int, step: int) -> None:
        """Drop a non-finite step's gradients; too many in a row raise ``TrainingDiverged``."""
        self.state.bad_steps += 1
        self.consecutive_bad += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.emit("on_message", f"[{self.phase.name}] non-finite loss at epoch {epoch + 1} "
                  f"batch {step}: step skipped ({self.consecutive_bad} in a row)")
        if self.consecutive_bad >= self.config.max_bad_steps:
            raise TrainingDiverged(
                f"the loss was non-finite {self.consecutive_bad} times in a row (epoch "
                f"{epoch + 1}, batch {step}); stopped. The last good checkpoint is "
                f"{self.out_dir / self.phase.last_file} (lower --lr or check the data)")

    def _interrupt(self) -> None:
        """Save the state mid-epoch (callbacks) and raise :class:`TrainingInterrupted`."""
        self.state.time_s = time.perf_counter() - self._started
        self.emit("on_interrupt", self.phase)
        barrier(self.ctx)
        path = self.out_dir / self.phase.last_file if self.ctx.is_main else None
        raise TrainingInterrupted(self.stop_signal() or "a signal on another rank", path)

    def _finish_epoch(self, epoch: int) -> None:
        """Validate, record the epoch, move the state on and let the callbacks save."""
        elapsed = time.perf_counter() - self._started
        count = self.state.count
        train = reduce_mean(self.state.means(), self.ctx, count)
        val = self._validate()
        is_best = improves(val[BEST_METRIC], self.state.best_psnr)
        record = {"phase": self.phase.name, "epoch": epoch + 1, "train": train, "val": val,
                  "time_s": elapsed,
                  "train_img_per_s": count * self.ctx.world_size / elapsed,
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "bad_steps": self.state.bad_steps, "is_best": is_best}
        self.history[:] = [r for r in self.history
                           if not (r["phase"] == self.phase.name and r["epoch"] >= epoch + 1)]
        self.history.append(record)
        if is_best:
            self.state.best_psnr = val[BEST_METRIC]
        self.state.finish_epoch()
        self.emit("on_epoch_end", self.phase, record)
        barrier(self.ctx)
        self.phase.set_train_mode(epoch)

    def _validate(self) -> dict[str, float]:
        """The phase's validation, on the averaged weights when an average is kept."""
        if self.average is None:
            return self.phase.validate()
        with self.average.applied():
            return self.phase.validate()
