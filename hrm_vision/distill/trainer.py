"""The distillation trainer: which phases run, with which models, and where they resume.

``Distiller(config).run(resume=None)`` runs up to three phases (:mod:`hrm_vision.distill.phases`),
each with its own optimizer (:class:`hrm_vision.distill.loop.PhaseLoop`):

1. ``teacher``: pre-trains the teacher VAE (recon + KL, same KL as the student) when the loss
   needs a teacher and none is given (``teacher_checkpoint``) or found
   (``checkpoint_dir/teacher.pth``). Writes ``teacher_last.pth`` each epoch and, at the end, the
   best epoch's teacher as ``teacher.pth``.
2. ``distill``: the student and the latent adapter learn from the frozen teacher (eval mode) with
   the five-term :class:`~hrm_vision.distill.losses.DistillLoss`. Writes ``tinyvae_last.pth``,
   ``tinyvae_best.pth`` and ``tinyvae_epoch_XXX.pth`` every ``save_interval`` epochs.
3. ``finetune`` (``finetune_epochs > 0``): the student alone (recon, KL, perceptual) with gradual
   unfreezing, starting from the best distilled student. Writes ``tinyvae_finetune_last.pth``
   (also before its first step) and replaces ``tinyvae_best.pth`` when an epoch beats the best
   student so far.

**Best** (``teacher.pth``, ``*_best.pth``): the epoch whose model, the one the phase trains,
reconstructs the validation set best, i.e. has the highest validation PSNR (pooled MSE over the
whole validation set, see :mod:`hrm_vision.metrics`); the earliest such epoch on ties. The total
loss is not used: the KL term, which dominates it, says little about reconstruction quality.
``tinyvae_best.pth`` is the best student of the whole run, over the distillation and fine-tuning
epochs (a distillation epoch wins a tie): the model to deploy. Its payload's ``phase`` and
``epoch`` say which epoch it holds; ``is_best`` in ``history.json`` marks each epoch that was
the best so far when it ended.

Every checkpoint is a full training state (:class:`~hrm_vision.distill.state.TrainingCheckpoint`)
written with CPU tensors, atomically, on rank 0, by the loop; ``run(resume=...)``
continues exactly where it stopped, with the checkpoint's phase, models and teacher, in its own
folder or a new one (:mod:`hrm_vision.distill.resume`). SIGINT/SIGTERM finish the current
optimizer step, save ``*_last.pth`` and raise :class:`TrainingInterrupted`. A non-finite loss
skips the step; ``max_bad_steps`` in a row raise :class:`TrainingDiverged` (the last good
checkpoint stays).
"""

from __future__ import annotations

import inspect
import math
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from ..compact import CompactVAE
from ..io import (
    CheckpointError,
    FolderLock,
    load,
    load_checkpoint,
    load_state_checked,
    model_entry,
    model_from_payload,
    save_checkpoint,
)
from ..vae import MODELS, LatentAdapter, VAEBase, build_model, model_name
from .callbacks import Callback, default_callbacks
from .config import DistillConfig, save_config
from .data import (
    DistContext,
    barrier,
    build_split,
    first_images,
    init_distributed,
    make_loader,
    reduce_mean,
)
from .loop import PhaseLoop, TrainingDiverged, TrainingInterrupted
from .losses import DistillLoss
from .perceptual import build_perceptual, resolve_backbone
from .phases import DistillPhase, FinetunePhase, Phase, PhaseContext, TeacherPhase
from .resume import check_config, find_resume, resumed_teacher, settle_resumed
from .state import TrainingCheckpoint, seed_everything

__all__ = ["Distiller", "TrainingDiverged", "TrainingInterrupted", "find_resume"]

#: Validation values that must be finite (PSNRs are pooled MSEs when the reduce sees them).
VALIDATION_CHECKS = {"total": "loss", "psnr": "reconstruction error",
                     "cross_psnr": "cross-decoding error"}

#: Phase names in the order they run.
PHASES = ("teacher", "distill", "finetune")


def configured_model(config: DistillConfig, role: str) -> VAEBase:
    """A freshly built ``role`` model (``"student"`` or ``"teacher"``) of ``config``: the
    registry model ``student_model`` / ``teacher_model`` with the role's size fields
    (``*_latent_dim``, ``*_base_channels``, ``teacher_blocks_per_stage``) as the constructor
    arguments it takes, and ``image_size`` as a compact model's crop side."""
    c = config
    if role == "student":
        name = c.student_model
        arch: dict[str, int] = {"latent_dim": c.student_latent_dim,
                                "base_channels": c.student_base_channels}
    elif role == "teacher":
        name = c.teacher_model
        arch = {"latent_dim": c.teacher_latent_dim, "base_channels": c.teacher_base_channels,
                "blocks_per_stage": c.teacher_blocks_per_stage}
    else:
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    if issubclass(MODELS[name], CompactVAE):
        arch["image_size"] = c.image_size
    takes = inspect.signature(MODELS[name]).parameters
    return build_model(name, **{k: v for k, v in arch.items() if k in takes})


class Distiller:
    """Runs the phases for one config.

    Args:
        config: the run's :class:`DistillConfig`.
        callbacks: callbacks added after the default ones (:func:`default_callbacks`: checkpoints,
            ``history.json``, pictures, console, TensorBoard with ``config.tensorboard``), never
            replacing them. Rank 0 only.
        ctx: a distributed context (default: ``init_distributed(config.device)``).
        console: show the progress bar and console log.
    """

    def __init__(self, config: DistillConfig, callbacks: Sequence[Callback] = (),
                 ctx: DistContext | None = None, console: bool = True) -> None:
        self.config = config
        self.ctx = ctx or init_distributed(config.device)
        self.device = self.ctx.device
        self.callbacks = ([*default_callbacks(console, tensorboard=config.tensorboard),
                           *callbacks] if self.ctx.is_main else [])
        self.out_dir = Path(config.checkpoint_dir)
        self.history: list[dict[str, Any]] = []
        self.stop_signal: str | None = None
        self.loop: PhaseLoop | None = None
        seed_everything(config.seed)
        self.train_set = build_split(config, "train")
        self.val_set = build_split(config, "val")
        loader_args = {"ctx": self.ctx, "seed": config.seed, "num_workers": config.num_workers}
        self.train_loader = make_loader(self.train_set, config.batch_size, shuffle=True,
                                        drop_last=len(self.train_set) > config.batch_size,
                                        **loader_args)
        self.val_loader = make_loader(self.val_set, config.batch_size, shuffle=False,
                                      **loader_args)
        self.phase_context = PhaseContext(
            config, self.device, self.train_set, self.val_set, self.val_loader,
            reduce=self._reduce_validation,
            message=self.message, show_progress=self.ctx.is_main)
        self.student = configured_model(config, "student").to(self.device)
        self.adapter = LatentAdapter(config.student_latent_dim, config.teacher_latent_dim,
                                     vector=len(self.student.latent_shape()) == 1
                                     ).to(self.device)
        self.teacher: VAEBase | None = None
        self.teacher_source = ""
        self.resume_source = "resume checkpoint"  # the file, once run(resume=...) has read it
        self.perceptual_name = "none"
        c = config
        #: The perceptual backbone (``auto`` resolved, here only) or ``"none"``, and whether
        #: the loss needs a teacher.
        self.perceptual_kind = (resolve_backbone(c.perceptual_backbone, c.vgg16_weights)
                                if c.perceptual_weight > 0 else "none")
        self.teacher_needed = (c.distill_latent_weight > 0 or c.distill_recon_weight > 0
                               or self.perceptual_kind == "teacher")

    def _reduce_validation(self, values: dict[str, float], count: int) -> dict[str, float]:
        """The phases' validation reduce (mean over ranks); a non-finite validation loss or
        reconstruction error means the weights diverged: :class:`TrainingDiverged`, before
        anything of the epoch is saved."""
        means = reduce_mean(values, self.ctx, count)
        bad = [name for key, name in VALIDATION_CHECKS.items()
               if key in means and not math.isfinite(means[key])]
        if bad:
            where = self.loop.last_good_checkpoint() if self.loop is not None else ""
            raise TrainingDiverged(
                f"validation after epoch {self.current_epoch + 1} gave a non-finite "
                f"{' and '.join(bad)}: the weights diverged; stopped. {where} (lower --lr or "
                "check the data)")
        return means

    # -------------------------------------------------------------- for callbacks
    def message(self, text: str) -> None:
        """Print ``text`` on rank 0 (through the callbacks)."""
        self._emit("on_message", text)

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    @property
    def current_epoch(self) -> int:
        """The 0-based epoch the running phase is in."""
        return self.loop.current_epoch if self.loop is not None else 0

    @property
    def bad_steps_total(self) -> int:
        """Non-finite steps skipped so far in the running phase."""
        return self.loop.state.bad_steps if self.loop is not None else 0

    # -------------------------------------------------------------- teacher
    def _teacher_path(self) -> Path | None:
        if self.config.teacher_checkpoint:
            return Path(self.config.teacher_checkpoint)
        found = self.out_dir / "teacher.pth"
        return found if found.is_file() else None

    def _load_teacher(self, path: Path) -> VAEBase:
        model = load(path, role="teacher")
        if model_name(model) != self.config.teacher_model:
            raise CheckpointError(f"{path}: the teacher role holds a {type(model).__name__} "
                                  f"({model_name(model)!r}), not teacher_model="
                                  f"{self.config.teacher_model!r}")
        if model.latent_dim != self.config.teacher_latent_dim:
            raise CheckpointError(f"{path}: teacher latent_dim {model.latent_dim} does not "
                                  f"match teacher_latent_dim={self.config.teacher_latent_dim}")
        self.teacher_source = str(path)
        self.message(f"teacher: loaded {path} ({model.num_parameters():,} parameters)")
        return model.to(self.device)

    def _obtain_teacher(self, resume: dict[str, Any] | None) -> None:
        """Load the teacher, pre-train it (continuing ``resume`` of the teacher phase), or
        leave it None when the loss needs none; then freeze it."""
        phase = resume["phase"] if resume is not None else None
        if phase is None:
            path = self._teacher_path()
        else:  # a resumed student phase continues with its checkpoint's teacher, if any
            path = None if phase == "teacher" else resumed_teacher(
                resume, self.config, self.resume_source, self.teacher_needed)
        if path is not None:
            self.teacher = self._load_teacher(path)
        elif self.teacher_needed:
            self.teacher = self._pretrain_teacher(resume if phase == "teacher" else None)
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.teacher.eval()

    def _pretrain_teacher(self, resume: dict[str, Any] | None) -> VAEBase:
        c = self.config
        if c.teacher_epochs == 0:
            raise ValueError("the loss needs a teacher but none was given "
                             "(--teacher-checkpoint) or found in checkpoint_dir, and "
                             "teacher_epochs is 0")
        teacher = configured_model(c, "teacher").to(self.device)
        self.message(f"teacher: pre-training {teacher.num_parameters():,} parameters for "
                     f"{c.teacher_epochs} epochs (phase 1)")
        phase = TeacherPhase(self.phase_context, teacher, c.teacher_epochs)
        self._fit(phase, resume, fresh=[teacher])
        path = self.out_dir / "teacher.pth"
        if self.ctx.is_main:
            best = load_checkpoint(self.out_dir / phase.best_file)
            save_checkpoint({**model_entry(model_from_payload(best, "teacher"), "teacher"),
                             "epoch": best["epoch"], "history": best["history"],
                             "config": c.model_dump()}, path, require_finite=True)
        barrier(self.ctx)
        return self._load_teacher(path)

    # -------------------------------------------------------------- run
    def build_loss(self, distill: bool = True) -> DistillLoss:
        """The five-term loss of this config (``distill=False``: the distillation weights 0)."""
        c = self.config
        kind = self.perceptual_kind
        backbone = None
        if kind != "none":
            backbone, self.perceptual_name = build_perceptual(
                kind, self.teacher, c.vgg16_weights, allow_download=c.download)
            backbone = backbone.to(self.device)
        return DistillLoss.from_config(c, backbone, distill=distill)

    def _student_phase(self, kind: type[DistillPhase], epochs: int,
                       loss: DistillLoss) -> DistillPhase:
        return kind(self.phase_context, epochs, self.student, self.adapter, self.teacher, loss,
                    self.perceptual_name, self.teacher_source)

    def run(self, resume: str | Path | None = None,
            force_resume: bool = False) -> dict[str, Path]:
        """Run the phases; ``resume`` is a checkpoint path or ``"auto"`` (see
        :mod:`hrm_vision.distill.resume`: the config fields that shape the run must equal the
        checkpoint's, unless ``force_resume``). Returns the files written (``best``, ``last``,
        ``teacher``, ``history``, ``config``...)."""
        # One writer per folder: rank 0 holds the lock for the whole run, before it reads a
        # checkpoint to resume, deletes temporaries or writes the effective config.
        with FolderLock(self.out_dir, "training") if self.ctx.is_main else nullcontext() as lock:
            payload = self._resume_payload(resume, force_resume)
            if lock is not None:
                stale = lock.remove_stale_temporaries()
                if stale:
                    self.message(f"removed {len(stale)} temporary file(s) of an interrupted "
                                 f"write in {self.out_dir}")
                save_config(self.config, self.out_dir / "config.json")
            self._emit("on_train_begin")
            try:
                with self._signal_handlers():
                    self._run_phases(payload)
            finally:
                self._emit("on_train_end")
        files = {"config": self.out_dir / "config.json", "history": self.out_dir / "history.json",
                 "best": self.out_dir / DistillPhase.best_file,
                 "last": self.out_dir / DistillPhase.last_file}
        if self.teacher_source:
            files["teacher"] = Path(self.teacher_source)
        return files

    def _run_phases(self, payload: dict[str, Any] | None) -> None:
        start = PHASES.index(payload["phase"]) if payload else 0
        self._obtain_teacher(payload)
        loss = self.build_loss()
        self.message(f"perceptual backbone: {self.perceptual_name}; distillation "
                     f"{'from the teacher' if loss.needs_teacher else 'off'}; "
                     f"device {self.device}, world size {self.ctx.world_size}")
        distill = self._student_phase(DistillPhase, self.config.epochs, loss)
        if start <= 1:
            distill.prepare()
            self._fit(distill, payload if start == 1 else None, fresh=[self.student])
        if self.config.finetune_epochs > 0:
            finetune = self._student_phase(FinetunePhase, self.config.finetune_epochs,
                                           self.build_loss(distill=False))
            incumbent = -math.inf  # restored from the payload when resuming
            if start <= 1:
                path = self.out_dir / DistillPhase.best_file
                raw = load_checkpoint(path)
                if raw.get("phase") != "distill" or "best_psnr" not in raw:
                    raise CheckpointError(f"{path} is not the best distillation checkpoint "
                                          f"(phase {raw.get('phase')!r}) the fine-tuning "
                                          "phase starts from")
                best = TrainingCheckpoint.from_payload(raw, str(path))
                load_state_checked(self.student, best.models["student_state_dict"],
                                   "best distilled student")
                incumbent = float(best.state.best_psnr)
                finetune.share_caches(distill)
            else:
                finetune.prepare()
            self._fit(finetune, payload if start == 2 else None, fresh=[], best=incumbent)

    def _fit(self, phase: Phase, payload: dict[str, Any] | None,
             fresh: Sequence[VAEBase], best: float = -math.inf) -> None:
        """Train ``phase``, continuing ``payload`` if given; otherwise the ``fresh`` (newly
        built) models first get ``init_from_data`` on the first training images (before the
        optimizer and the DDP wrapper see them). ``best``: the validation PSNR (dB) an epoch
        must beat to be the best (a resumed phase takes it from ``payload``)."""
        if payload is None and fresh:
            images = first_images(self.train_set).to(self.device)
            for model in fresh:
                model.init_from_data(images)
            phase.init_fresh()
        loop = PhaseLoop(phase, ctx=self.ctx, loader=self.train_loader, history=self.history,
                         emit=self._emit, stop_signal=lambda: self.stop_signal, best=best)
        if payload is not None:
            loop.restore(payload, f"{self.resume_source} ({payload['phase']} phase)")
            self.message(f"resuming {payload['phase']} from {self.resume_source} (epoch "
                         f"{loop.state.epoch}, batch {loop.state.step_in_epoch})")
            self._resumed(phase, loop)
        self.loop = loop
        loop.run()

    def _resumed(self, phase: Phase, loop: PhaseLoop) -> None:
        """After a restore: :func:`~hrm_vision.distill.resume.settle_resumed` (say when no
        epoch is left, bring the best checkpoint into a new folder)."""
        for note in settle_resumed(self.resume_source, self.out_dir, phase, loop.state,
                                   self.config.finetune_epochs, write=self.ctx.is_main):
            self.message(note)
        barrier(self.ctx)  # the best file is in place before any rank reads it

    def _resume_payload(self, resume: str | Path | None,
                        force: bool = False) -> dict[str, Any] | None:
        if resume is None:
            return None
        path = find_resume(self.out_dir) if str(resume) == "auto" else Path(resume)
        if path is None:
            self.message(f"resume auto: no checkpoint in {self.out_dir}, starting fresh")
            return None
        payload = load_checkpoint(path)
        self.resume_source = str(path)
        if payload.get("phase") not in PHASES or "optimizer_state_dict" not in payload:
            raise CheckpointError(f"{path} is not a training checkpoint of this trainer "
                                  "(no phase/optimizer state); pass it as --teacher-checkpoint "
                                  "or load it with hrm_vision.load")
        forced = check_config(payload, self.config, str(path), force)
        if forced:
            self.message(f"--force-resume: resuming {path} with {'; '.join(forced)}")
        return payload  # the rest is checked once, where the phase restores it (models first)

    @contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """SIGINT/SIGTERM set ``stop_signal``; the loop saves and stops after the current step."""
        def handler(signum: int, frame: Any) -> None:
            self.stop_signal = signal.Signals(signum).name

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

