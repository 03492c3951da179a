"""The training loop of one phase: optimizer steps, accumulation, AMP, skipped steps, signals,
validation, history records and resumable state.

:class:`PhaseLoop` owns the optimizer, schedule, scaler and :class:`TrainState` of a phase. It
knows nothing of the trainer: it reports through ``emit(hook, *args)`` (the callbacks, which only
observe), reads a stop request through ``stop_signal()`` and appends its epoch records to the
shared ``history`` list. It writes the phase's files itself, on rank 0 (:meth:`PhaseLoop.save`).

The epoch commit: at the end of an epoch the callbacks run first (pictures, TensorBoard, console,
the user's), then ``history.json``, ``tinyvae_epoch_XXX.pth`` every ``save_interval`` epochs,
``*_best.pth`` when the epoch is the best so far, and last ``*_last.pth``, which commits the epoch:
every other file of the epoch is written before it, each atomically. A run killed before the
commit resumes (``--resume auto``) from the previous epoch's ``*_last.pth`` and trains the epoch
again, which rewrites those files with the same content; killed after it, nothing of the epoch is
missing. TensorBoard event files are appended to, not replaced: their epoch is flushed before the
commit, and an epoch trained again after a kill is logged again, with the same values. A phase
that inherits the previous phase's best file (fine-tuning: ``tinyvae_best.pth``) commits its start
to ``*_last.pth`` before its first step, so a resume never reads the best file again after the
phase has replaced it; a stop signal saves ``*_last.pth`` mid-epoch; a phase of zero epochs
still leaves loadable files (the untrained models).

Bad steps: a batch whose loss is not finite is skipped (its gradients dropped); an optimizer step
that leaves a non-finite parameter, buffer or optimizer state is undone: :class:`LastGoodState`
holds a copy of the module and optimizer state taken before each accumulation window, and it is
put back. Neither counts as a step (no schedule step, no update of the weight average, no
``global_step``); both count in ``bad_steps``. ``max_bad_steps`` bad steps in a row, or an epoch
in which no optimizer step was kept, raise :class:`TrainingDiverged`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..io import CheckpointError, check_fits, non_finite_tensors, save_checkpoint, write_json
from .data import DistContext, barrier, first_images, reduce_mean, set_epoch, wrap_ddp
from .optim import (
    WeightAverage,
    autocast,
    build_optimizer,
    build_scheduler,
    make_scaler,
    steps_per_epoch,
)
from .phases import Phase
from .state import (
    BEST_METRIC,
    LastGoodState,
    TrainingCheckpoint,
    TrainState,
    rng_state,
    set_rng_state,
)


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state was saved to ``checkpoint`` (resume with it)."""

    def __init__(self, signame: str, checkpoint: Path | None) -> None:
        self.signame, self.checkpoint = signame, checkpoint
        where = f"; saved {checkpoint}, resume with --resume auto" if checkpoint else ""
        super().__init__(f"stopped by {signame} after the current step{where}")


class TrainingDiverged(RuntimeError):
    """``max_bad_steps`` bad steps in a row (non-finite loss, or non-finite weights after the
    optimizer step), or an epoch in which every step was bad."""


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
    """Trains ``phase`` for its epochs on ``loader`` (yielding ``(index, images)``), under the
    run's config ``phase.ctx.config``; files go to its ``checkpoint_dir``.

    Args (keyword-only after ``phase``):
        phase: what trains and how it is validated.
        ctx: the distributed context (device, rank).
        loader: this rank's training batches.
        history: the run's epoch records; this phase's records are replaced or appended.
        emit: ``emit(hook, *args)`` calls a callback hook (rank 0 only).
        stop_signal: the name of a pending stop signal, or None.
        best: the validation ``BEST_METRIC`` an epoch must beat to be the best (-inf: the
            phase's own first epoch is; a phase that inherits the previous phase's best file
            starts with that file's value).
    """

    def __init__(self, phase: Phase, *, ctx: DistContext, loader: DataLoader,
                 history: list[dict[str, Any]], emit: Emit,
                 stop_signal: Callable[[], str | None], best: float = -math.inf) -> None:
        config = phase.ctx.config
        self.phase, self.config, self.ctx = phase, config, ctx
        self.loader, self.history, self.emit = loader, history, emit
        self.stop_signal, self.out_dir = stop_signal, Path(config.checkpoint_dir)
        self.module = phase.trainable()
        phase.calibrate()  # before the DDP wrapper (rank 0's value) and the weight average
        self.wrapped = wrap_ddp(self.module, ctx)
        self.optimizer = build_optimizer(phase.param_groups(), config)
        self.steps_per_epoch = steps_per_epoch(len(loader), config.grad_accum_steps)
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps,
                                         phase.epochs * self.steps_per_epoch)
        self.scaler = make_scaler(config, ctx.device)
        self.average = (WeightAverage(self.module, config.ema_decay)
                        if config.ema_decay > 0 else None)
        self.state = TrainState(best_psnr=best)
        self.restored = False
        self.current_epoch = 0
        self.consecutive_bad = 0
        self._bad_kinds: set[str] = set()
        self.last_good = LastGoodState(self.module, self.optimizer)
        self._save_due = True  # take a copy before the next window's first forward pass
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
        keys), then every other key, type-checked here, once
        (:meth:`TrainingCheckpoint.from_payload`): optimizer, scheduler, scaler, state, history
        and RNG."""
        self.phase.load_models(payload, source)
        saved = TrainingCheckpoint.from_payload(payload, source)
        if self.average is not None:
            if "train_state_dict" in payload:
                check_fits(self.module, payload["train_state_dict"],
                           f"{source} (train_state_dict)")
            updates = payload.get("ema_updates", 1)
            if not isinstance(updates, int) or isinstance(updates, bool) or updates < 0:
                raise CheckpointError(f"{source}: ema_updates must be an integer >= 0, got "
                                      f"{updates!r}")
            self.average.restore(payload)
        bad = non_finite_tensors(saved.optimizer_state_dict)
        if bad:
            raise CheckpointError(f"{source}: the optimizer state holds NaN or infinite values "
                                  f"in {', '.join(bad[:5])}")
        for what, load in (("optimizer_state_dict", lambda: self.optimizer.load_state_dict(
                                saved.optimizer_state_dict)),
                           ("scheduler_state_dict", lambda: self.scheduler.load_state_dict(
                               saved.scheduler_state_dict)),
                           ("scaler_state_dict", lambda: saved.scaler_state_dict
                            and self.scaler.load_state_dict(saved.scaler_state_dict)),
                           ("rng_state", lambda: set_rng_state(saved.rng_state))):
            try:
                load()
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
                raise CheckpointError(f"{source}: {what} does not fit this run: "
                                      f"{type(exc).__name__}: {exc}") from exc
        self.state = saved.state
        self.history[:] = saved.history
        self.restored = True

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Train from the current state to the last epoch, then emit ``on_phase_end``; a phase
        started from its beginning (not restored) first emits ``on_phase_begin``."""
        if not self.restored:
            self.emit("on_phase_begin", self.phase)
            if self.phase.inherits_best:
                self.save([self.phase.last_file])
        for epoch in range(self.state.epoch, self.phase.epochs):
            if self.patience_spent():
                break
            self._train_epoch(epoch)
            self._finish_epoch(epoch)
        if self.phase.epochs == 0 and not (self.out_dir / self.phase.best_file).exists():
            self.save([self.phase.best_file, self.phase.last_file])
        self.emit("on_phase_end", self.phase)

    def epochs_without_best(self) -> int:
        """How many of this phase's latest epochs in a row did not beat the best before them."""
        flags = [r["is_best"] for r in self.history if r["phase"] == self.phase.name]
        return len(flags) - (max(i for i, best in enumerate(flags) if best) + 1 if any(flags)
                             else 0)

    def patience_spent(self) -> bool:
        """Whether ``early_stop_patience`` epochs in a row brought no better validation PSNR."""
        patience = self.config.early_stop_patience
        return patience is not None and self.epochs_without_best() >= patience

    def save(self, names: list[str]) -> None:
        """Write the phase's state now (:meth:`checkpoint`) to each of ``names`` in the
        checkpoint folder, in order, on rank 0; a non-finite tensor is refused."""
        if not self.ctx.is_main:
            return
        payload = self.checkpoint().to_payload()
        for name in names:
            save_checkpoint(payload, self.out_dir / name, require_finite=True)

    def _commit_epoch(self, record: dict[str, Any]) -> None:
        """``history.json``, the snapshot, the best file, then ``*_last.pth`` (the commit)."""
        if self.ctx.is_main:
            write_json(self.history, self.out_dir / "history.json")
        names = []
        if self.phase.epoch_file and record["epoch"] % self.config.save_interval == 0:
            names.append(self.phase.epoch_file.format(epoch=record["epoch"]))
        if record["is_best"]:
            names.append(self.phase.best_file)
        self.save([*names, self.phase.last_file])

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
        if self._save_due:
            self.last_good.save()
            self._save_due = False
        x = x.to(self.ctx.device, non_blocking=True)
        with autocast(self.config, self.ctx.device):
            terms = self.phase.loss(self.wrapped, index, x)
        finite = not self._any_rank(not bool(torch.isfinite(terms["total"]).item()))
        boundary = ((step + 1) % self.config.grad_accum_steps == 0
                    or step + 1 == len(self.loader))
        if not finite:
            # the forward pass may have left non-finite BatchNorm statistics: back to the copy
            self.last_good.restore()
            self._bad_step(epoch, step, "loss")
            return boundary
        self.scaler.scale(terms["total"] / self.config.grad_accum_steps).backward()
        if boundary and not self._optimizer_step():
            self._bad_step(epoch, step, "weights")
            return boundary
        if boundary:
            self.consecutive_bad, self._bad_kinds = 0, set()
            self.phase.after_step(terms)
        values = {k: float(v.detach()) for k, v in terms.items()}
        self.state.add(values, x.shape[0])
        self.emit("on_batch_end", self.phase, step, values)
        if (step + 1) % self.config.log_interval == 0:
            self.emit("on_log", self.phase, step + 1, values)
        return boundary

    def _optimizer_step(self) -> bool:
        """One optimizer step; False (and the step undone) when it left a non-finite parameter,
        buffer or optimizer state on any rank."""
        for p in self.phase.frozen_parameters(self.current_epoch):
            p.grad = None  # AdamW leaves parameters without a gradient untouched
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._save_due = True
        if self._any_rank(not self.last_good.all_finite()):
            self.last_good.restore()
            return False
        self.scheduler.step()
        if self.average is not None:
            self.average.update()
        self.state.global_step += 1
        self.state.good_steps += 1
        return True

    def last_good_checkpoint(self) -> str:
        """The sentence naming the checkpoint a diverged run leaves."""
        path = self.out_dir / self.phase.last_file
        if path.is_file():
            return f"The last good checkpoint is {path}"
        return f"No checkpoint of this phase was written ({path} does not exist)"

    def _bad_step(self, epoch: int, step: int, kind: str) -> None:
        """Count a bad step (``kind``: ``"loss"`` when the loss was non-finite, ``"weights"``
        when the optimizer step was undone) and drop its gradients; ``max_bad_steps`` in a row
        raise ``TrainingDiverged``."""
        self.state.bad_steps += 1
        self.consecutive_bad += 1
        self._bad_kinds.add(kind)
        self.optimizer.zero_grad(set_to_none=True)
        what = ("non-finite loss" if kind == "loss"
                else "non-finite weights after the optimizer step")
        action = "step skipped" if kind == "loss" else "step undone"
        self.emit("on_message", f"[{self.phase.name}] {what} at epoch {epoch + 1} "
                  f"batch {step}: {action} ({self.consecutive_bad} in a row)")
        if self.consecutive_bad >= self.config.max_bad_steps:
            subject = {frozenset({"loss"}): "the loss was",
                       frozenset({"weights"}): "the weights became"}.get(
                frozenset(self._bad_kinds), "the loss or the weights were")
            raise TrainingDiverged(
                f"{subject} non-finite {self.consecutive_bad} times in a row (epoch "
                f"{epoch + 1}, batch {step}); stopped. {self.last_good_checkpoint()}"
                " (lower --lr or check the data)")

    def _interrupt(self) -> None:
        """Save the state mid-epoch (callbacks) and raise :class:`TrainingInterrupted`."""
        self.state.time_s = time.perf_counter() - self._started
        self.emit("on_interrupt", self.phase)
        self.save([self.phase.last_file])
        barrier(self.ctx)
        path = self.out_dir / self.phase.last_file if self.ctx.is_main else None
        raise TrainingInterrupted(self.stop_signal() or "a signal on another rank", path)

    def _finish_epoch(self, epoch: int) -> None:
        """Validate, record the epoch, move the state on, let the callbacks see it, commit."""
        if self.state.good_steps == 0:
            raise TrainingDiverged(
                f"epoch {epoch + 1} of the {self.phase.name} phase kept no optimizer step "
                f"({self.state.bad_steps} bad steps so far: non-finite loss or weights); "
                f"stopped. {self.last_good_checkpoint()} (lower --lr or check "
                "the data)")
        elapsed = time.perf_counter() - self._started
        count = self.state.count
        train = reduce_mean(self.state.means(), self.ctx, count)
        val = self._validate()
        value_share, gradient_share = self._term_shares()
        is_best = val[BEST_METRIC] > self.state.best_psnr  # strictly: ties keep the earlier
        record = {"phase": self.phase.name, "epoch": epoch + 1, "train": train, "val": val,
                  "time_s": elapsed,
                  "train_img_per_s": count * self.ctx.world_size / elapsed,
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "bad_steps": self.state.bad_steps, "is_best": is_best,
                  "value_share": value_share, "gradient_share": gradient_share}
        self.history[:] = [r for r in self.history
                           if not (r["phase"] == self.phase.name and r["epoch"] >= epoch + 1)]
        self.history.append(record)
        if is_best:
            self.state.best_psnr = val[BEST_METRIC]
        if self.patience_spent() and epoch + 1 < self.phase.epochs:
            record["early_stop"] = True
            self.emit("on_message", f"[{self.phase.name}] early stop after epoch {epoch + 1}: "
                      f"no better validation PSNR in {self.epochs_without_best()} epochs "
                      f"(early_stop_patience); the best is {self.state.best_psnr:.2f} dB")
        self.state.finish_epoch()
        self.emit("on_epoch_end", self.phase, record)
        self._commit_epoch(record)
        barrier(self.ctx)
        self.phase.set_train_mode(epoch)

    def _term_shares(self) -> tuple[dict[str, float], dict[str, float]]:
        """Each term's share of the objective and of the gradient norm on the first training
        batch (the same images every epoch; the random streams are left as they were)."""
        x = first_images(self.phase.ctx.train_set, self.config.batch_size).to(self.ctx.device)
        devices = [self.ctx.device.index or 0] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), autocast(self.config, self.ctx.device):
            self.phase.set_train_mode(self.current_epoch)
            return self.phase.term_shares(self.module, torch.arange(len(x)), x)

    def _validate(self) -> dict[str, float]:
        """The phase's validation, on the averaged weights when an average is kept."""
        if self.average is None:
            return self.phase.validate()
        with self.average.applied():
            return self.phase.validate()
