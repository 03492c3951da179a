"""The three training phases: what trains, its loss, its validation, its checkpoint files.

A phase sees only a :class:`PhaseContext` (config, device, datasets, a cross-rank reduce and a
message sink) and the models it was given; the loop (:mod:`hrm_vision.distill.loop`) drives it.

- :class:`TeacherPhase`: the teacher VAE alone with recon + KL (free bits), like the student's.
- :class:`DistillPhase`: student + adapter against the frozen teacher with the five-term loss.
- :class:`FinetunePhase`: the student alone (recon, KL, perceptual); the encoder is frozen (its
  gradients dropped, so AdamW neither moves it nor decays it) for the first
  half of the epochs, then everything trains.

Every phase trains its loss's likelihood scale with the model (:class:`Trainable`), calibrated
at the phase's start (:meth:`Phase.calibrate`) and saved in its checkpoints.

Validation reports every loss term (nats per image), PSNR of the mean decode ``psnr`` and of a
seeded posterior sample ``psnr_sample`` (pooled over the validation set, see
:mod:`hrm_vision.metrics`), the rate (``kl_per_element`` in nats, ``bits_per_pixel``) and SSIM
of the model the phase trains; the distillation phases add
the teacher's PSNR/SSIM, the quality ratio, the latent CKA and ``cross_psnr``: the teacher's
decoder reading the adapted student latent, ``teacher.decode(adapter(student.encode(x)))``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..io import load_state_checked, model_entry, to_cpu
from ..metrics import (
    error_image,
    linear_cka,
    mean_over,
    mse,
    psnr_from_mse,
    rate_and_sample,
    ssim,
)
from ..objective import gradient_shares, value_shares
from ..vae import LatentAdapter, VAEBase
from .config import DistillConfig
from .data import IndexedDataset, TeacherCache, first_images
from .losses import DistillLoss, TeacherTargets, Trainable, adapt, teacher_targets

#: Validation images shown in the reconstruction grids.
GRID_IMAGES = 8


@dataclass
class PhaseContext:
    """What a phase may use of the run: nothing of the trainer itself.

    ``reduce(values, count)`` averages per-rank means over all ranks (weighted by ``count``);
    ``message`` prints on rank 0; ``show_progress`` is true on rank 0.
    """

    config: DistillConfig
    device: torch.device
    train_set: IndexedDataset
    val_set: IndexedDataset
    val_loader: DataLoader
    reduce: Callable[[dict[str, float], int], dict[str, float]]
    message: Callable[[str], None] = print
    show_progress: bool = True
    _grid: Tensor | None = field(default=None, repr=False)

    def grid_images(self) -> Tensor:
        """The first ``GRID_IMAGES`` validation images, ``(n, 3, H, W)`` on the device."""
        if self._grid is None:
            n = min(GRID_IMAGES, len(self.val_set))
            self._grid = torch.stack([self.val_set[i][1] for i in range(n)]).to(self.device)
        return self._grid


#: Validation keys that hold a PSNR: batches report their MSE under these keys, the
#: sample-weighted mean over the set (the pooled MSE: all images have the same size) becomes a
#: PSNR after the cross-rank reduction (:func:`pooled_psnr`).
PSNR_KEYS = ("psnr", "psnr_sample", "teacher_psnr", "cross_psnr")



def pooled_psnr(values: dict[str, float]) -> dict[str, float]:
    """``values`` with each of ``PSNR_KEYS`` turned from a pooled MSE into a PSNR in dB."""
    return {k: psnr_from_mse(v) if k in PSNR_KEYS else v for k, v in values.items()}


class Phase:
    """One training phase. Subclasses set the names and implement the model-specific parts;
    ``criterion`` is the phase's loss (None in a phase with a loss of its own: then nothing is
    calibrated and no term shares are reported), whose ``scale`` trains with the model."""

    criterion: DistillLoss | None = None

    name = ""
    last_file = best_file = ""
    epoch_file: str | None = None
    #: Whether the phase continues the previous phase's best: its ``best_file`` is the previous
    #: phase's, which keeps the previous best model until an epoch of this phase beats it
    #: (the loop starts with the previous best value; the trainer passes it).
    inherits_best = False

    def __init__(self, ctx: PhaseContext, epochs: int) -> None:
        self.ctx, self.epochs = ctx, epochs
        self._pictures: tuple[int, list[tuple[str, Tensor]]] | None = None

    def trainable(self) -> nn.Module:
        """The module whose parameters the optimizer updates (wrapped in DDP by the loop)."""
        raise NotImplementedError

    def init_fresh(self) -> None:
        """Called once on a fresh run, after the fresh models' ``init_from_data``."""

    def calibrate(self) -> None:
        """Start the likelihood scale at the error of the trained model's sampled
        reconstruction of the first training images (a resumed phase then loads its own)."""
        if self.criterion is None:
            return
        model = self.trainable().model
        images = first_images(self.ctx.train_set).to(self.ctx.device)
        sigma = self.criterion.calibrate(model, images)
        self.ctx.message(f"[{self.name}] likelihood scale: sigma = {sigma:.4g} (the sampled "
                         f"reconstruction's RMS error on {len(images)} training images)")

    def after_step(self, terms: dict[str, Tensor]) -> None:
        """After a kept optimizer step on a batch with loss ``terms``: a rate target follows
        the KL per element averaged over the processes (every process calls this)."""
        if self.criterion is not None and self.criterion.rate is not None:
            kl = self.ctx.reduce({"kl": float(terms["kl_per_element"])}, 1)["kl"]
            self.criterion.after_step(kl)

    def term_shares(self, module: nn.Module, index: Tensor, x: Tensor
                    ) -> tuple[dict[str, float], dict[str, float]]:
        """Each weighted term's share of the objective and of its gradient norm over the
        trained parameters, on one batch (``index`` (B,), ``x`` (B, C, H, W) in [0, 1]):
        ``(value_shares, gradient_shares)``, each ``{term: share in [0, 1]}`` (both empty
        without a ``criterion``)."""
        if self.criterion is None:
            return {}, {}
        weighted = self.criterion.weighted(self.loss(module, index, x))
        return value_shares(weighted), gradient_shares(weighted, list(module.parameters()))

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups."""
        return [{"params": [p for p in self.trainable().parameters() if p.requires_grad]}]

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        """Parameters that must not change during ``epoch`` (their gradients are dropped before
        each optimizer step)."""
        return []

    def set_train_mode(self, epoch: int) -> None:
        """Put the trained modules in training mode for ``epoch`` (0-based)."""
        self.trainable().train()

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        """Loss terms and ``"total"`` of a batch: ``index`` (B,) dataset indices, ``x`` images
        (B, 3, H, W) in [0, 1]; ``module`` is :meth:`trainable`, possibly DDP-wrapped."""
        raise NotImplementedError

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation metrics, the same on every rank."""
        raise NotImplementedError

    def model_payload(self) -> dict[str, Any]:
        """The checkpoint keys of the phase's models."""
        raise NotImplementedError

    def load_models(self, payload: dict[str, Any], source: str) -> None:
        """Load the phase's models from a checkpoint dict (``source`` names it in errors)."""
        raise NotImplementedError

    def picture_rows(self) -> list[tuple[str, Tensor]]:
        """Labelled rows of the reconstruction grid, each ``(n, 3, H, W)`` in [0, 1]."""
        return []

    def epoch_picture_rows(self, epoch: int) -> list[tuple[str, Tensor]]:
        """:meth:`picture_rows` at the end of ``epoch``, computed once however many writers
        (PNG, TensorBoard) ask for it."""
        if self._pictures is None or self._pictures[0] != epoch:
            self._pictures = (epoch, self.picture_rows())
        return self._pictures[1]


class TeacherPhase(Phase):
    """Phase 1: the teacher VAE alone with recon + KL (free bits), like the student's terms."""

    name = "teacher"
    last_file, best_file = "teacher_last.pth", "teacher_best.pth"

    def __init__(self, ctx: PhaseContext, teacher: VAEBase, epochs: int) -> None:
        super().__init__(ctx, epochs)
        self.teacher = teacher
        self.criterion = DistillLoss.vae(ctx.config)
        self.model = Trainable(teacher, self.criterion.scale)

    def trainable(self) -> nn.Module:
        return self.model

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        out, _ = module(x)
        return self.criterion(x, out, None, None)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.teacher.eval()

        def batch(index: Tensor, x: Tensor) -> dict[str, float]:
            x = x.to(self.ctx.device)
            out = self.teacher(x)
            return {**{k: v.item() for k, v in self.criterion(x, out, None, None).items()},
                    **rate_and_sample(self.teacher, x, index, out.mu, out.logvar),
                    "psnr": mse(out.reconstruction, x), "ssim": ssim(out.reconstruction, x)}

        return pooled_psnr(self.ctx.reduce(*mean_over(self.ctx.val_loader, batch)))

    def model_payload(self) -> dict[str, Any]:
        return {**model_entry(self.teacher, "teacher"), **self.criterion.scale_payload()}

    def load_models(self, payload: dict[str, Any], source: str) -> None:
        load_state_checked(self.teacher, payload["teacher_state_dict"], f"{source} (teacher)")
        self.criterion.load_scale(payload, source)

    def picture_rows(self) -> list[tuple[str, Tensor]]:
        x = self.ctx.grid_images()
        with torch.no_grad():
            rec = self.teacher.eval()(x).reconstruction
        return [("input", x), ("teacher", rec), ("error x10", error_image(rec, x))]


class DistillPhase(Phase):
    """Phase 2: student + adapter against the frozen teacher with the five-term loss.

    ``teacher`` None trains the student alone (the distillation weights must then be 0).
    ``perceptual_name`` and ``teacher_source`` are recorded in the checkpoints.
    """

    name = "distill"
    last_file, best_file, epoch_file = ("tinyvae_last.pth", "tinyvae_best.pth",
                                        "tinyvae_epoch_{epoch:03d}.pth")

    def __init__(self, ctx: PhaseContext, epochs: int, student: VAEBase, adapter: LatentAdapter,
                 teacher: VAEBase | None, loss: DistillLoss, perceptual_name: str = "none",
                 teacher_source: str = "") -> None:
        super().__init__(ctx, epochs)
        self.student, self.adapter, self.teacher = student, adapter, teacher
        self.criterion = loss
        self.perceptual_name, self.teacher_source = perceptual_name, teacher_source
        self.model = self._trainable()
        self.train_cache: TeacherCache | None = None
        self.val_cache: TeacherCache | None = None

    def _trainable(self) -> Trainable:
        return Trainable(self.student, self.criterion.scale, self.adapter)

    def trainable(self) -> nn.Module:
        return self.model

    def init_fresh(self) -> None:
        """A fresh student (after ``init_from_data``): the adapter starts as the composition of
        the two models' linear paths (:meth:`LatentAdapter.init_from_linear_paths`)."""
        if self.teacher is not None and self.adapter.init_from_linear_paths(
                self.student, self.teacher):
            self.ctx.message("adapter: initialised from the two models' linear patch paths")

    def prepare(self) -> None:
        """Build the teacher caches (when there is a teacher and the config enables them)."""
        if self.teacher is None or not self.ctx.config.teacher_cache:
            return
        ctx, start = self.ctx, time.perf_counter()
        bs = max(ctx.config.batch_size, 64)
        self.train_cache = TeacherCache.build(self.teacher, ctx.train_set, bs, ctx.device,
                                              "teacher cache (train)", ctx.show_progress)
        self.val_cache = TeacherCache.build(self.teacher, ctx.val_set, bs, ctx.device,
                                            "teacher cache (val)", ctx.show_progress)
        ctx.message(f"teacher cache: {len(ctx.train_set) + len(ctx.val_set)} images in "
                    f"{time.perf_counter() - start:.1f}s, "
                    f"{(self.train_cache.nbytes + self.val_cache.nbytes) / 2**20:.0f} MiB")

    def share_caches(self, other: DistillPhase) -> None:
        """Reuse ``other``'s teacher caches (same datasets, same teacher)."""
        self.train_cache, self.val_cache = other.train_cache, other.val_cache

    def targets(self, index: Tensor, x: Tensor, cache: TeacherCache | None
                ) -> TeacherTargets | None:
        """The teacher's outputs for a batch: from ``cache`` if given, else computed."""
        if self.teacher is None:
            return None
        if cache is not None:
            return cache.lookup(index, self.ctx.device)
        return teacher_targets(self.teacher, x)

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        out, adapted = module(x)
        return self.criterion(x, out, adapted, self.targets(index, x, self.train_cache))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.student.eval()
        latents: dict[str, list[Tensor]] = {"student": [], "adapted": [], "teacher": []}

        def batch(index: Tensor, x: Tensor) -> dict[str, float]:
            x = x.to(self.ctx.device)
            out = self.student(x)
            adapted = adapt(self.adapter, out.mu, out.logvar)
            teach = self.targets(index, x, self.val_cache)
            values = {k: v.item() for k, v in
                      self.criterion(x, out, adapted, teach).items()}
            values.update(rate_and_sample(self.student, x, index, out.mu, out.logvar))
            values.update(psnr=mse(out.reconstruction, x), ssim=ssim(out.reconstruction, x))
            if teach is not None:
                values.update(teacher_psnr=mse(teach.reconstruction, x),
                              teacher_ssim=ssim(teach.reconstruction, x))
                if self.teacher is not None:  # the teacher's decoder reading the student
                    values["cross_psnr"] = mse(self.teacher.decode(adapted[0]), x)
                for key, z in (("student", out.mu), ("adapted", adapted[0]),
                               ("teacher", teach.mu)):
                    latents[key].append(z.float().cpu())
            return values

        values, count = mean_over(self.ctx.val_loader, batch)
        if latents["teacher"] and count >= 2:
            teacher_mu = torch.cat(latents["teacher"])
            values["cka"] = linear_cka(torch.cat(latents["adapted"]), teacher_mu)
            values["cka_raw"] = linear_cka(torch.cat(latents["student"]), teacher_mu)
        values = pooled_psnr(self.ctx.reduce(values, count))
        if "teacher_psnr" in values:
            values["quality_ratio"] = values["psnr"] / values["teacher_psnr"]
        return values

    def model_payload(self) -> dict[str, Any]:
        return {**model_entry(self.student, "student"),
                "adapter_state_dict": to_cpu(self.adapter.state_dict()),
                "adapter_arch": self.adapter.arch_config(),
                "perceptual_backbone": self.perceptual_name,
                "teacher_source": self.teacher_source, **self.criterion.scale_payload()}

    def load_models(self, payload: dict[str, Any], source: str) -> None:
        load_state_checked(self.student, payload["student_state_dict"], f"{source} (student)")
        load_state_checked(self.adapter, payload["adapter_state_dict"], f"{source} (adapter)")
        self.criterion.load_scale(payload, source)

    def picture_rows(self) -> list[tuple[str, Tensor]]:
        x = self.ctx.grid_images()
        with torch.no_grad():
            rows = [("input", x)]
            if self.teacher is not None:
                rows.append(("teacher", self.teacher.eval()(x).reconstruction))
            rec = self.student.eval()(x).reconstruction
        return rows + [("student", rec), ("error x10", error_image(rec, x))]


class FinetunePhase(DistillPhase):
    """Phase 3: the student alone (recon, KL, perceptual), decoder first, then the encoder.

    It starts from the best distilled student and shares ``tinyvae_best.pth`` with the
    distillation phase (``inherits_best``): an epoch replaces it only when its validation PSNR
    beats every distillation and fine-tuning epoch before it. Its loss's scale starts at the
    distilled student's error (:meth:`Phase.calibrate`).
    """

    name = "finetune"
    last_file, best_file, epoch_file = "tinyvae_finetune_last.pth", DistillPhase.best_file, None
    inherits_best = True

    def _trainable(self) -> Trainable:
        return Trainable(self.student, self.criterion.scale)

    @property
    def unfreeze_epoch(self) -> int:
        """The first epoch (0-based) that trains the encoder: half the phase's epochs."""
        return self.epochs // 2

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.student.decoder.parameters())},
                {"params": list(self.student.encoder.parameters())},
                {"params": list(self.criterion.scale.parameters())}]

    def encoder_frozen(self, epoch: int) -> bool:
        """Whether the encoder is frozen during ``epoch`` (0-based): the first half."""
        return epoch < self.unfreeze_epoch

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        return list(self.student.encoder.parameters()) if self.encoder_frozen(epoch) else []

    def set_train_mode(self, epoch: int) -> None:
        self.model.train()
        if self.encoder_frozen(epoch):
            self.student.encoder.eval()

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        out, _ = module(x)
        return self.criterion(x, out, None, None)
