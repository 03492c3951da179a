"""The distillation trainer: phases, the training loop, checkpoints, resume, signals.

``Distiller(config).run(resume=None)`` runs up to three phases, each with its own optimizer:

1. ``teacher``: pre-trains the teacher VAE (recon + KL, same KL as the student) when the loss
   needs a teacher and none is given (``teacher_checkpoint``) or found
   (``checkpoint_dir/teacher.pth``). Writes ``teacher_last.pth`` each epoch and, at the end, the
   best epoch's teacher as ``teacher.pth``.
2. ``distill``: the student and the latent adapter learn from the frozen teacher (eval mode) with
   the five-term :class:`~hrm_vision.distill.losses.DistillLoss`. Writes ``tinyvae_last.pth``,
   ``tinyvae_best.pth`` (lowest validation value of the same total loss) and
   ``tinyvae_epoch_XXX.pth`` every ``save_interval`` epochs.
3. ``finetune`` (``finetune_epochs > 0``): the student alone (recon, KL, perceptual) with gradual
   unfreezing: the encoder is frozen (learning rate 0, BatchNorm in eval) for the first half,
   then everything trains. Writes ``tinyvae_finetune_{last,best}.pth``.

Every checkpoint is a full training state (models, optimizer, scheduler, AMP scaler, epoch,
position in the epoch, best value, history, RNG states, config), written atomically on rank 0
through :func:`hrm_vision.checkpoints.save_checkpoint`; ``run(resume=...)`` continues exactly
where it stopped. SIGINT/SIGTERM finish the current optimizer step, save ``*_last.pth`` and raise
:class:`TrainingInterrupted`. A non-finite loss skips the step; ``max_bad_steps`` in a row raise
:class:`TrainingDiverged` (the last good checkpoint stays).
"""

from __future__ import annotations

import functools
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_model,
    load_state_checked,
    model_entry,
    model_from_payload,
    save_checkpoint,
)
from ..data import build_dataset
from ..metrics import linear_cka, psnr, ssim
from ..vae import MinimalVAE, TeacherVAE, VAEBase, VAEOutput
from .adapter import LatentAdapter
from .callbacks import Callback, ConsoleLog, HistoryWriter, PictureWriter, ProgressBar
from .config import DistillConfig, save_config
from .distributed import (
    DistContext,
    barrier,
    init_distributed,
    make_loader,
    reduce_mean,
    set_epoch,
    wrap_ddp,
)
from .losses import DistillLoss, TeacherTargets, adapt, kl_free_bits, vae_loss
from .perceptual import build_perceptual, find_vgg16_weights

#: Validation images shown in the reconstruction grids.
GRID_IMAGES = 8


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state was saved to ``checkpoint`` (resume with it)."""

    def __init__(self, signame: str, checkpoint: Path | None) -> None:
        self.signame, self.checkpoint = signame, checkpoint
        where = f"; saved {checkpoint}, resume with --resume auto" if checkpoint else ""
        super().__init__(f"stopped by {signame} after the current step{where}")


class TrainingDiverged(RuntimeError):
    """The loss was non-finite ``max_bad_steps`` times in a row."""


# ---------------------------------------------------------------------------------------- data
class IndexedDataset(Dataset[tuple[int, Tensor]]):
    """Yields ``(index, image)`` so per-index teacher outputs can be looked up."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        item = self.base[index]
        return index, item[0] if isinstance(item, (tuple, list)) else item


@functools.lru_cache(maxsize=4)
def _dataset(name: str, split: str, image_size: int, seed: int, data_dir: str,
             download: bool) -> Dataset:
    # datasets are deterministic per index, so one instance serves every run in this process
    return build_dataset(name, split, image_size=image_size, seed=seed, data_dir=data_dir,
                         download=download)


def build_split(config: DistillConfig, split: str) -> IndexedDataset:
    """The ``split`` of ``config.dataset``, cut to ``train_samples``/``val_samples``."""
    ds = _dataset(config.dataset, split, config.image_size, config.seed, config.data_dir,
                  config.download)
    limit = config.train_samples if split == "train" else config.val_samples
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    return IndexedDataset(ds)


class TeacherCache:
    """The frozen teacher's outputs for every index of a dataset, kept in fp16 on the CPU.

    Built once per phase (the datasets are deterministic per index): a distillation step then
    reads ``(mu, logvar, reconstruction)`` instead of running the teacher.
    """

    def __init__(self, mu: Tensor, logvar: Tensor, reconstruction: Tensor) -> None:
        self.mu, self.logvar, self.reconstruction = mu, logvar, reconstruction

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: VAEBase, dataset: IndexedDataset, batch_size: int,
              device: torch.device, desc: str = "teacher cache",
              show: bool = True) -> TeacherCache:
        teacher.eval()
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for _, x in tqdm(loader, desc=desc, leave=False, disable=not show):
            out = teacher(x.to(device))
            parts.append((out.mu.half().cpu(), out.logvar.half().cpu(),
                          out.reconstruction.half().cpu()))
        return cls(*(torch.cat(t) for t in zip(*parts, strict=True)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mu, self.logvar,
                                                           self.reconstruction))

    def lookup(self, index: Tensor, device: torch.device) -> TeacherTargets:
        return TeacherTargets(self.mu[index].to(device).float(),
                              self.logvar[index].to(device).float(),
                              self.reconstruction[index].to(device).float())


# ---------------------------------------------------------------------------------------- phases
class StudentWithAdapter(nn.Module):
    """Student plus adapter in one module (one DDP wrapper):
    ``x -> (VAEOutput, (adapted_mu, adapted_var))``."""

    def __init__(self, student: MinimalVAE, adapter: LatentAdapter) -> None:
        super().__init__()
        self.student, self.adapter = student, adapter

    def forward(self, x: Tensor) -> tuple[VAEOutput, tuple[Tensor, Tensor]]:
        out = self.student(x)
        return out, adapt(self.adapter, out.mu, out.logvar)


class Phase:
    """One training phase: what trains, its loss, its validation, its checkpoint files."""

    name = ""
    last_file = best_file = ""
    epoch_file: str | None = None

    def __init__(self, trainer: Distiller, epochs: int) -> None:
        self.trainer, self.epochs = trainer, epochs

    # -- subclasses implement
    def trainable(self) -> nn.Module:
        """The module whose parameters the optimizer updates (wrapped in DDP by the trainer)."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.trainable().parameters() if p.requires_grad]}]

    def lr_factor(self, group: int, step: int, steps_per_epoch: int) -> float:
        return 1.0

    def set_train_mode(self) -> None:
        self.trainable().train()

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    def model_payload(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_models(self, payload: dict[str, Any], source: str) -> None:
        raise NotImplementedError

    def picture_rows(self) -> list[Tensor]:
        return []


def _mean_over(loader: DataLoader, fn: Any) -> tuple[dict[str, float], int]:
    """Sample-weighted mean of ``fn(index, x) -> dict`` over a loader; returns (means, count)."""
    sums: dict[str, float] = {}
    count = 0
    for index, x in loader:
        values = fn(index, x)
        n = x.shape[0]
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        count += n
    return {k: v / max(count, 1) for k, v in sums.items()}, count


class TeacherPhase(Phase):
    """Phase 1: the teacher VAE alone with recon + KL (free bits), like the student's terms."""

    name = "teacher"
    last_file, best_file = "teacher_last.pth", "teacher_best.pth"

    def __init__(self, trainer: Distiller, teacher: TeacherVAE) -> None:
        super().__init__(trainer, trainer.config.teacher_epochs)
        self.teacher = teacher

    def trainable(self) -> nn.Module:
        return self.teacher

    def _terms(self, module: nn.Module, x: Tensor) -> dict[str, Tensor]:
        c = self.trainer.config
        return vae_loss(x, module(x), c.recon_weight, c.kl_weight, c.kl_free_bits)

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        return self._terms(module, x)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.teacher.eval()
        dev = self.trainer.device

        def batch(index: Tensor, x: Tensor) -> dict[str, float]:
            x = x.to(dev)
            out = self.teacher(x)
            terms = vae_loss(x, out, self.trainer.config.recon_weight,
                             self.trainer.config.kl_weight, self.trainer.config.kl_free_bits)
            return {**{k: v.item() for k, v in terms.items()},
                    "psnr": psnr(out.reconstruction, x), "ssim": ssim(out.reconstruction, x)}

        return self.trainer.reduce(*_mean_over(self.trainer.val_loader, batch))

    def model_payload(self) -> dict[str, Any]:
        return model_entry(self.teacher, "teacher")

    def load_models(self, payload: dict[str, Any], source: str) -> None:
        load_state_checked(self.teacher, payload["teacher_state_dict"], f"{source} (teacher)")

    def picture_rows(self) -> list[Tensor]:
        x = self.trainer.grid_images()
        with torch.no_grad():
            return [x, self.teacher.eval()(x).reconstruction]


class DistillPhase(Phase):
    """Phase 2: student + adapter against the frozen teacher with the five-term loss."""

    name = "distill"
    last_file, best_file, epoch_file = ("tinyvae_last.pth", "tinyvae_best.pth",
                                        "tinyvae_epoch_{epoch:03d}.pth")

    def __init__(self, trainer: Distiller, epochs: int, loss: DistillLoss) -> None:
        super().__init__(trainer, epochs)
        self.criterion = loss
        self.model = StudentWithAdapter(trainer.student, trainer.adapter)
        self.train_cache: TeacherCache | None = None
        self.val_cache: TeacherCache | None = None
        self.teacher_val: dict[str, float] | None = None

    def trainable(self) -> nn.Module:
        return self.model

    def prepare(self) -> None:
        """Build the teacher caches (if enabled) and the teacher's validation metrics."""
        t = self.trainer
        if t.teacher is None:
            return
        t.teacher.eval()
        if t.config.teacher_cache:
            start = time.perf_counter()
            bs = max(t.config.batch_size, 64)
            self.train_cache = TeacherCache.build(t.teacher, t.train_set, bs, t.device,
                                                  "teacher cache (train)", t.ctx.is_main)
            self.val_cache = TeacherCache.build(t.teacher, t.val_set, bs, t.device,
                                                "teacher cache (val)", t.ctx.is_main)
            t.message(f"teacher cache: {len(t.train_set) + len(t.val_set)} images in "
                      f"{time.perf_counter() - start:.1f}s, "
                      f"{(self.train_cache.nbytes + self.val_cache.nbytes) / 2**20:.0f} MiB")

    def targets(self, index: Tensor, x: Tensor, cache: TeacherCache | None
                ) -> TeacherTargets | None:
        t = self.trainer
        if t.teacher is None:
            return None
        if cache is not None:
            return cache.lookup(index, t.device)
        with torch.no_grad():
            out = t.teacher(x)
        return TeacherTargets(out.mu.float(), out.logvar.float(), out.reconstruction.float())

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        out, adapted = module(x)
        return self.criterion(x, out, adapted, self.targets(index, x, self.train_cache))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        t = self.trainer
        self.model.eval()
        lat: dict[str, list[Tensor]] = {"student": [], "adapted": [], "teacher": []}

        def batch(index: Tensor, x: Tensor) -> dict[str, float]:
            x = x.to(t.device)
            out, adapted = self.model(x)
            teach = self.targets(index, x, self.val_cache)
            terms = self.criterion(x, out, adapted, teach)
            values = {k: v.item() for k, v in terms.items()}
            values["kl_nats"] = kl_free_bits(out.mu, out.logvar, 0.0).item()
            values["psnr"] = psnr(out.reconstruction, x)
            values["ssim"] = ssim(out.reconstruction, x)
            if teach is not None:
                values["teacher_psnr"] = psnr(teach.reconstruction, x)
                values["teacher_ssim"] = ssim(teach.reconstruction, x)
                lat["student"].append(out.mu.float().cpu())
                lat["adapted"].append(adapted[0].float().cpu())
                lat["teacher"].append(teach.mu.float().cpu())
            return values

        values, count = _mean_over(t.val_loader, batch)
        if lat["teacher"] and count >= 2:
            teacher_mu = torch.cat(lat["teacher"])
            values["cka"] = linear_cka(torch.cat(lat["adapted"]), teacher_mu)
            values["cka_raw"] = linear_cka(torch.cat(lat["student"]), teacher_mu)
        values = t.reduce(values, count)
        if "teacher_psnr" in values:
            values["quality_ratio"] = values["psnr"] / values["teacher_psnr"]
        return values

    def model_payload(self) -> dict[str, Any]:
        t = self.trainer
        return {**model_entry(t.student, "student"),
                "adapter_state_dict": {k: v.detach().cpu()
                                       for k, v in t.adapter.state_dict().items()},
                "adapter_arch": t.adapter.arch_config(),
                "perceptual_backbone": t.perceptual_name,
                "teacher_source": t.teacher_source}

    def load_models(self, payload: dict[str, Any], source: str) -> None:
        t = self.trainer
        load_state_checked(t.student, payload["student_state_dict"], f"{source} (student)")
        load_state_checked(t.adapter, payload["adapter_state_dict"], f"{source} (adapter)")

    def picture_rows(self) -> list[Tensor]:
        t = self.trainer
        x = t.grid_images()
        with torch.no_grad():
            rows = [x]
            if t.teacher is not None:
                rows.append(t.teacher.eval()(x).reconstruction)
            rows.append(t.student.eval()(x).reconstruction)
        return rows


class FinetunePhase(DistillPhase):
    """Phase 3: the student alone (recon, KL, perceptual), decoder first, then the encoder."""

    name = "finetune"
    last_file, best_file, epoch_file = ("tinyvae_finetune_last.pth",
                                        "tinyvae_finetune_best.pth", None)

    def __init__(self, trainer: Distiller, epochs: int, loss: DistillLoss) -> None:
        super().__init__(trainer, epochs, loss)
        self.unfreeze_epoch = epochs // 2

    def trainable(self) -> nn.Module:
        return self.trainer.student

    def param_groups(self) -> list[dict[str, Any]]:
        s = self.trainer.student
        return [{"params": list(s.decoder.parameters())},
                {"params": list(s.encoder.parameters())}]

    def encoder_frozen(self) -> bool:
        return self.trainer.current_epoch < self.unfreeze_epoch

    def lr_factor(self, group: int, step: int, steps_per_epoch: int) -> float:
        return 0.0 if group == 1 and step < self.unfreeze_epoch * steps_per_epoch else 1.0

    def set_train_mode(self) -> None:
        self.trainer.student.train()
        if self.encoder_frozen():
            self.trainer.student.encoder.eval()

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        return self.criterion(x, module(x), None, None)


# ---------------------------------------------------------------------------------------- trainer
def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
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


def find_resume(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume auto`` continues from: the latest phase's ``*_last.pth``."""
    d = Path(checkpoint_dir)
    for phase in (FinetunePhase, DistillPhase, TeacherPhase):
        if (d / phase.last_file).is_file():
            return d / phase.last_file
    return None


class Distiller:
    """Runs the phases for one config. ``callbacks=None`` uses the console, progress bar,
    history and picture callbacks (all on rank 0 only).

    Args:
        config: the run's :class:`DistillConfig`.
        callbacks: extra or replacement callbacks (rank 0 only).
        ctx: a distributed context (default: ``init_distributed(config.device)``).
    """

    PHASES = ("teacher", "distill", "finetune")

    def __init__(self, config: DistillConfig, callbacks: list[Callback] | None = None,
                 ctx: DistContext | None = None) -> None:
        self.config = config
        self.ctx = ctx or init_distributed(config.device)
        self.device = self.ctx.device
        if callbacks is None:
            callbacks = [ProgressBar(), ConsoleLog(), HistoryWriter(), PictureWriter()]
        self.callbacks = callbacks if self.ctx.is_main else []
        self.out_dir = Path(config.checkpoint_dir)
        self.history: list[dict[str, Any]] = []
        self.current_epoch = 0
        self.stop_signal: str | None = None
        self.bad_steps_total = 0
        seed_everything(config.seed)
        self.train_set = build_split(config, "train")
        self.val_set = build_split(config, "val")
        loader_args = {"ctx": self.ctx, "seed": config.seed, "num_workers": config.num_workers}
        self.train_loader = make_loader(self.train_set, config.batch_size, shuffle=True,
                                        drop_last=len(self.train_set) > config.batch_size,
                                        **loader_args)
        self.val_loader = make_loader(self.val_set, config.batch_size, shuffle=False,
                                      **loader_args)
        self.student = MinimalVAE(config.student_latent_dim,
                                  config.student_base_channels).to(self.device)
        self.adapter = LatentAdapter(config.student_latent_dim,
                                     config.teacher_latent_dim).to(self.device)
        self.teacher: TeacherVAE | None = None
        self.teacher_source = ""
        self.perceptual_name = "none"
        self._grid: Tensor | None = None

    # -------------------------------------------------------------- small helpers
    def message(self, text: str) -> None:
        """Print ``text`` on rank 0 (through the callbacks)."""
        for cb in self.callbacks:
            cb.on_message(self, text)

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def reduce(self, values: dict[str, float], count: int) -> dict[str, float]:
        return reduce_mean(values, self.ctx, count)

    def grid_images(self) -> Tensor:
        if self._grid is None:
            n = min(GRID_IMAGES, len(self.val_set))
            self._grid = torch.stack([self.val_set[i][1] for i in range(n)]).to(self.device)
        return self._grid

    def _autocast(self) -> Any:
        mode = self.config.mixed_precision
        if mode == "auto":
            mode = "fp16" if self.device.type == "cuda" else "off"
        if mode == "off":
            return nullcontext()
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _uses_scaler(self) -> bool:
        mode = self.config.mixed_precision
        return self.device.type == "cuda" and mode in ("auto", "fp16")

    # -------------------------------------------------------------- teacher
    def _teacher_needed(self) -> tuple[bool, str]:
        """Whether the loss needs a teacher, and the perceptual backbone kind it resolves to."""
        c = self.config
        kind = "none"
        if c.perceptual_weight > 0:
            kind = c.perceptual_backbone
            if kind == "auto":
                kind = "vgg16" if find_vgg16_weights(c.vgg16_weights) is not None else "teacher"
        needs = c.distill_latent_weight > 0 or c.distill_recon_weight > 0 or kind == "teacher"
        return needs, kind

    def _teacher_path(self) -> Path | None:
        if self.config.teacher_checkpoint:
            return Path(self.config.teacher_checkpoint)
        found = self.out_dir / "teacher.pth"
        return found if found.is_file() else None

    def _load_teacher(self, path: Path) -> TeacherVAE:
        model = load_model(path, role="teacher")
        if not isinstance(model, TeacherVAE):
            raise CheckpointError(f"{path}: the teacher role holds a {type(model).__name__}")
        if model.latent_dim != self.config.teacher_latent_dim:
            raise CheckpointError(f"{path}: teacher latent_dim {model.latent_dim} does not "
                                  f"match teacher_latent_dim={self.config.teacher_latent_dim}")
        self.teacher_source = str(path)
        self.message(f"teacher: loaded {path} ({model.num_parameters():,} parameters)")
        return model.to(self.device)

    def _obtain_teacher(self, resume: dict[str, Any] | None) -> None:
        needed, _ = self._teacher_needed()
        path = self._teacher_path()
        if resume is not None and resume["phase"] == "teacher":
            path = None  # an unfinished pre-training run continues
        if path is not None:
            self.teacher = self._load_teacher(path)
        elif needed:
            c = self.config
            if c.teacher_epochs == 0:
                raise ValueError("the loss needs a teacher but none was given "
                                 "(--teacher-checkpoint) or found in checkpoint_dir, and "
                                 "teacher_epochs is 0")
            teacher = TeacherVAE(c.teacher_latent_dim, c.teacher_base_channels,
                                 c.teacher_blocks_per_stage).to(self.device)
            self.message(f"teacher: pre-training {teacher.num_parameters():,} parameters for "
                         f"{c.teacher_epochs} epochs (phase 1)")
            phase = TeacherPhase(self, teacher)
            self._fit(phase, resume if resume and resume["phase"] == "teacher" else None)
            best = load_checkpoint(self.out_dir / phase.best_file) if self.ctx.is_main else None
            if self.ctx.is_main and best is not None:
                save_checkpoint({**model_entry(model_from_payload(best, "teacher"), "teacher"),
                                 "epoch": best["epoch"], "history": best["history"],
                                 "config": self.config.model_dump()},
                                self.out_dir / "teacher.pth")
            barrier(self.ctx)
            self.teacher = self._load_teacher(self.out_dir / "teacher.pth")
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.teacher.eval()

    # -------------------------------------------------------------- run
    def build_loss(self, distill: bool = True) -> DistillLoss:
        """The five-term loss of this config (``distill=False``: the distillation weights 0)."""
        c = self.config
        _, kind = self._teacher_needed()
        backbone = None
        if kind != "none":
            backbone, self.perceptual_name = build_perceptual(
                kind, self.teacher, c.vgg16_weights, allow_download=c.download)
            backbone = backbone.to(self.device)
        return DistillLoss(c.recon_weight, c.kl_weight,
                           c.distill_latent_weight if distill else 0.0,
                           c.distill_recon_weight if distill else 0.0,
                           c.perceptual_weight, c.kl_free_bits, c.temperature, backbone)

    def run(self, resume: str | Path | None = None) -> dict[str, Path]:
        """Run the phases; ``resume`` is a checkpoint path or ``"auto"``. Returns the files
        written (``best``, ``last``, ``teacher``, ``history``, ``config``...)."""
        payload = self._resume_payload(resume)
        if self.ctx.is_main:
            save_config(self.config, self.out_dir / "config.json")
        self._emit("on_train_begin")
        try:
            with self._signal_handlers():
                start = self.PHASES.index(payload["phase"]) if payload else 0
                if payload is not None:
                    self.history = list(payload["history"])
                self._obtain_teacher(payload)
                loss = self.build_loss()
                self.message(f"perceptual backbone: {self.perceptual_name}; distillation "
                             f"{'from the teacher' if loss.needs_teacher else 'off'}; "
                             f"device {self.device}, world size {self.ctx.world_size}")
                phase = DistillPhase(self, self.config.epochs, loss)
                if start <= 1:
                    phase.prepare()
                    self._fit(phase, payload if start == 1 else None)
                if self.config.finetune_epochs > 0:
                    ft = FinetunePhase(self, self.config.finetune_epochs,
                                       self.build_loss(distill=False))
                    if start <= 1:
                        load_state_checked(self.student, load_checkpoint(
                            self.out_dir / DistillPhase.best_file)["student_state_dict"],
                            "best distilled student")
                        ft.train_cache, ft.val_cache = phase.train_cache, phase.val_cache
                    else:
                        ft.prepare()
                    self._fit(ft, payload if start == 2 else None)
        finally:
            self._emit("on_train_end")
        files = {"config": self.out_dir / "config.json", "history": self.out_dir / "history.json",
                 "best": self.out_dir / DistillPhase.best_file,
                 "last": self.out_dir / DistillPhase.last_file}
        if self.teacher_source:
            files["teacher"] = Path(self.teacher_source)
        return files

    def _resume_payload(self, resume: str | Path | None) -> dict[str, Any] | None:
        if resume is None:
            return None
        path = find_resume(self.out_dir) if str(resume) == "auto" else Path(resume)
        if path is None:
            self.message(f"resume auto: no checkpoint in {self.out_dir}, starting fresh")
            return None
        payload = load_checkpoint(path)
        if payload.get("phase") not in self.PHASES or "optimizer_state_dict" not in payload:
            raise CheckpointError(f"{path} is not a training checkpoint of this trainer "
                                  "(no phase/optimizer state); pass it as --teacher-checkpoint "
                                  "or load it with hrm_vision.checkpoints.load_model")
        self.message(f"resuming {payload['phase']} from {path} (epoch {payload['epoch']}, "
                     f"batch {payload['step_in_epoch']})")
        return payload

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

    # -------------------------------------------------------------- the loop
    def _any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is set on any rank (the same answer on every rank)."""
        return reduce_mean({"flag": float(flag)}, self.ctx, 1)["flag"] > 0.0

    def _fit(self, phase: Phase, payload: dict[str, Any] | None) -> None:
        c = self.config
        module = phase.trainable()
        wrapped = wrap_ddp(module, self.ctx)
        optimizer = torch.optim.AdamW(phase.param_groups(), lr=c.learning_rate,
                                      weight_decay=c.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(self.train_loader) / c.grad_accum_steps))
        total_steps = max(1, phase.epochs * steps_per_epoch)

        def schedule(group: int) -> Any:
            def factor(step: int) -> float:
                warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
                progress = min(1.0, step / total_steps)
                return (warm * 0.5 * (1 + math.cos(math.pi * progress))
                        * phase.lr_factor(group, step, steps_per_epoch))
            return factor

        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [schedule(i) for i in range(len(optimizer.param_groups))])
        scaler = torch.amp.GradScaler("cuda", enabled=self._uses_scaler())
        state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_value": math.inf,
                 "running": {}, "count": 0, "time_s": 0.0}
        if payload is not None:
            source = f"resume checkpoint ({payload['phase']})"
            phase.load_models(payload, source)
            optimizer.load_state_dict(payload["optimizer_state_dict"])
            scheduler.load_state_dict(payload["scheduler_state_dict"])
            if payload.get("scaler_state_dict"):
                scaler.load_state_dict(payload["scaler_state_dict"])
            for k in state:
                state[k] = payload.get(k, state[k])
            self.bad_steps_total = int(payload.get("bad_steps", 0))
            self.history = list(payload["history"])
            _set_rng_state(payload["rng_state"])

        def save(path_name: str, **extra: Any) -> Path | None:
            if not self.ctx.is_main:
                return None
            return save_checkpoint({
                "phase": phase.name, **phase.model_payload(), **state, **extra,
                "bad_steps": self.bad_steps_total, "history": self.history,
                "config": c.model_dump(),
                "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(),
                "scaler_state_dict": scaler.state_dict(),
                "rng_state": _rng_state(),
            }, self.out_dir / path_name)

        consecutive_bad = 0
        for epoch in range(int(state["epoch"]), phase.epochs):
            self.current_epoch = epoch
            set_epoch(self.train_loader, epoch)
            phase.set_train_mode()
            skip = int(state["step_in_epoch"])
            if skip == 0:
                state["running"], state["count"], state["time_s"] = {}, 0, 0.0
            self._emit("on_epoch_begin", phase, epoch, len(self.train_loader))
            started = time.perf_counter() - float(state["time_s"])
            optimizer.zero_grad(set_to_none=True)
            n_batches = len(self.train_loader)
            for step, (index, x) in enumerate(self.train_loader):
                if step < skip:
                    continue
                x = x.to(self.device, non_blocking=True)
                with self._autocast():
                    terms = phase.loss(wrapped, index, x)
                finite = not self._any_rank(not bool(torch.isfinite(terms["total"]).item()))
                boundary = (step + 1) % c.grad_accum_steps == 0 or step + 1 == n_batches
                if not finite:
                    self.bad_steps_total += 1
                    consecutive_bad += 1
                    optimizer.zero_grad(set_to_none=True)
                    self.message(f"[{phase.name}] non-finite loss at epoch {epoch + 1} batch "
                                 f"{step}: step skipped ({consecutive_bad} in a row)")
                    if consecutive_bad >= c.max_bad_steps:
                        raise TrainingDiverged(
                            f"the loss was non-finite {consecutive_bad} times in a row (epoch "
                            f"{epoch + 1}, batch {step}); stopped. The last good checkpoint is "
                            f"{self.out_dir / phase.last_file} (lower --lr or check the data)")
                else:
                    consecutive_bad = 0
                    scaler.scale(terms["total"] / c.grad_accum_steps).backward()
                    if boundary:
                        if c.grad_clip is not None:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(module.parameters(), c.grad_clip)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                        state["global_step"] = int(state["global_step"]) + 1
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    running = state["running"]
                    for k, v in values.items():
                        running[k] = running.get(k, 0.0) + v * x.shape[0]
                    state["count"] = int(state["count"]) + x.shape[0]
                    self._emit("on_batch_end", phase, step, values)
                    if (step + 1) % c.log_interval == 0:
                        self._emit("on_log", phase, step + 1, values)
                state["step_in_epoch"] = step + 1
                if boundary and self._any_rank(self.stop_signal is not None):
                    state["time_s"] = time.perf_counter() - started
                    path = save(phase.last_file)
                    barrier(self.ctx)
                    raise TrainingInterrupted(self.stop_signal or "a signal on another rank",
                                              path)
            elapsed = time.perf_counter() - started
            train = self.reduce({k: v / max(int(state["count"]), 1)
                                 for k, v in state["running"].items()}, int(state["count"]))
            val = phase.validate()
            is_best = val["total"] < float(state["best_value"])
            record = {"phase": phase.name, "epoch": epoch + 1, "train": train, "val": val,
                      "time_s": elapsed,
                      "train_img_per_s": int(state["count"]) * self.ctx.world_size / elapsed,
                      "lr": optimizer.param_groups[0]["lr"], "bad_steps": self.bad_steps_total,
                      "is_best": is_best}
            self.history = [r for r in self.history
                            if not (r["phase"] == phase.name and r["epoch"] >= epoch + 1)]
            self.history.append(record)
            if is_best:
                state["best_value"] = val["total"]
            state.update(epoch=epoch + 1, step_in_epoch=0, running={}, count=0, time_s=0.0)
            save(phase.last_file)
            if is_best:
                save(phase.best_file)
            if phase.epoch_file and (epoch + 1) % c.save_interval == 0:
                save(phase.epoch_file.format(epoch=epoch + 1))
            self._emit("on_epoch_end", phase, record)
            barrier(self.ctx)
            phase.set_train_mode()
        if phase.epochs == 0 and self.ctx.is_main and not (self.out_dir / phase.best_file).exists():
            # zero epochs: still leave loadable files (the untrained models)
            save(phase.last_file)
            save(phase.best_file)
