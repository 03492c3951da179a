"""The training loop of a distillation run.

``Distiller(config).run(resume=None)`` runs up to three phases, each with its own optimizer:
``teacher`` pre-trains the teacher VAE when the loss needs one and none is given or found (its
best epoch becomes ``teacher.pth``); ``distill`` trains the student and the latent adapter
against the frozen teacher; ``finetune`` trains the student alone from the best distilled one.
``*_last.pth`` is a phase's resumable state; ``*_best.pth`` (the highest validation PSNR,
earliest on ties), ``teacher.pth`` and ``tinyvae_epoch_XXX.pth`` are deployable.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import os
import random
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from ..compact import CompactVAE
from ..data import PROBE_EPOCH, STREAM_SCALES, CropStream, build_dataset, unseen_crops
from ..io import (
    CheckpointError,
    FolderLock,
    atomic_write,
    check_fits,
    load,
    load_checkpoint,
    load_state_checked,
    model_entry,
    model_from_payload,
    non_finite_tensors,
    save_checkpoint,
    to_cpu,
    write_json,
)
from ..metrics import error_image, linear_cka, mean_over, mse, psnr_from_mse, rate_and_sample, ssim
from ..vae import MODELS, LatentAdapter, VAEBase, build_model, model_name
from .callbacks import Callback, default_callbacks
from .config import DistillConfig, build_parser, config_from_args, save_config
from .loss import (
    DistillLoss,
    TeacherTargets,
    Trainable,
    adapt,
    build_perceptual,
    gradient_shares,
    resolve_backbone,
    teacher_targets,
    value_shares,
)

#: Phase names in the order they run.
PHASES = ("teacher", "distill", "finetune")
#: Training images passed to ``init_from_data`` (fewer when the split is smaller).
INIT_IMAGES = 4096
#: Validation images shown in the reconstruction grids.
GRID_IMAGES = 8
#: Validation keys holding a PSNR: batches report their MSE, the pooled MSE becomes a PSNR after
#: the cross-rank mean (:func:`pooled_psnr`).
PSNR_KEYS = ("psnr", "psnr_sample", "teacher_psnr", "teacher_psnr_sample", "cross_psnr")
#: The metric that picks the best epoch and stops a phase early: the held-out PSNR (strictly
#: greater than the best before it).
BEST_METRIC = "psnr"


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state was saved to ``checkpoint`` (resume with it)."""

    def __init__(self, signame: str, checkpoint: Path | None) -> None:
        self.signame, self.checkpoint = signame, checkpoint
        where = f"; saved {checkpoint}, resume with --resume auto" if checkpoint else ""
        super().__init__(f"stopped by {signame} after the current step{where}")


class TrainingDiverged(RuntimeError):
    """``max_bad_steps`` bad steps in a row, an epoch without a good step, or a bad validation."""


class ResumeMismatch(ValueError):
    """The config of a resumed run differs from its checkpoint's in a field that shapes it."""


# ================================================================ processes (torchrun)

@dataclass(frozen=True)
class DistContext:
    """This process's rank among ``world_size`` and its device (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """The context of this process, joining the torchrun process group (gloo on CPU, nccl on
    CUDA, ``cuda:LOCAL_RANK``) when ``WORLD_SIZE > 1``. ``device`` None: cuda if available."""
    if device is None:
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise ValueError(f"invalid device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use "
                             "--device cpu")
        if resolved.type not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistContext(device=resolved)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def reduce_mean(values: dict[str, float], ctx: DistContext, count: int) -> dict[str, float]:
    """The mean of each rank's ``values`` (means over ``count`` samples) over all samples of all
    ranks, the same on every rank; keys whose total count is 0 become NaN. Ranks passing
    different keys get a ``ValueError`` (not a hang)."""
    if not ctx.enabled:
        return dict(values)
    keys = sorted(values)
    signature = torch.tensor([zlib.crc32("\0".join(keys).encode())], dtype=torch.int64,
                             device=ctx.device)
    gathered = [torch.empty_like(signature) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, signature)
    if any(int(g) != int(signature) for g in gathered):
        raise ValueError(f"reduce_mean: rank {ctx.rank} reduces keys {keys}, another rank "
                         "reduces different ones; every rank must pass the same keys")
    data = torch.tensor([float(values[k]) * count for k in keys] + [float(count)],
                        dtype=torch.float64, device=ctx.device)
    dist.all_reduce(data, op=dist.ReduceOp.SUM)
    total = data[-1].item()
    means = dict(zip(keys, (s / total if total > 0 else float("nan")
                            for s in data[:-1].tolist()), strict=True))
    return {k: means[k] for k in values}


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op on one process)."""
    if ctx.enabled:
        dist.barrier(**({"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}))


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op on one process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(module)`` when distributed, else ``module``."""
    if not ctx.enabled:
        return module
    return DistributedDataParallel(
        module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


# ================================================================ data: splits, loaders, cache

def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM (a terminal or Slurm signals the whole group):
    the main process decides, finishes the step and saves."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, ctx: DistContext, seed: int,
                drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A DataLoader over this rank's share of ``dataset`` that never draws from the global RNG:
    the order of epoch ``e`` is a permutation seeded with ``seed + e`` (or ``0..n-1`` without
    ``shuffle``); call :func:`set_epoch` before each epoch."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the dataset is empty")
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=ctx.device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_stop_signals if num_workers else None)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select epoch ``epoch``'s sample order, worker seeds and streamed crops (the workers
    start each epoch with a copy of the dataset)."""
    base = getattr(loader.dataset, "base", None)
    if isinstance(base, CropStream):
        base.set_epoch(epoch)
    sampler = loader.sampler
    sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    loader.generator.manual_seed(sampler.seed + epoch)  # type: ignore[attr-defined, union-attr]


class IndexedDataset(Dataset[tuple[int, Tensor]]):
    """``(index, image)`` pairs (image ``(3, H, W)`` in [0, 1]) for the teacher cache."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        item = self.base[index]
        return index, item[0] if isinstance(item, (tuple, list)) else item


@functools.lru_cache(maxsize=4)
def _dataset(name: str, split: str, image_size: int, seed: int, data_dir: str,
             download: bool, crops: str = "fixed", num_crops: int | None = None,
             crop_scales: tuple[float, float] = STREAM_SCALES) -> Dataset:
    if split == "unseen":
        return unseen_crops(name, num_crops or 1024, image_size, data_dir, seed)
    return build_dataset(name, split, image_size=image_size, seed=seed, data_dir=data_dir,
                         download=download, crops=crops, num_crops=num_crops,
                         crop_scales=crop_scales)


def build_split(config: DistillConfig, split: str) -> IndexedDataset:
    """The ``split`` (``train``, ``val``, ``unseen``) of ``config``, cut to
    ``train_samples``/``val_samples`` (a stream draws that many); datasets are deterministic
    per index (a stream per epoch), so one instance serves every run of a process."""
    c = config
    limit = c.train_samples if split == "train" else c.val_samples
    if split == "unseen":
        ds = _dataset(c.unseen_dataset, split, c.image_size, c.seed, c.unseen_data_dir or "",
                      False, "stream", limit)
    elif c.crops == "stream":
        ds = _dataset(c.dataset, split, c.image_size, c.seed, c.data_dir, False, "stream", limit,
                      (c.crop_scale_min, c.crop_scale_max))
    else:
        ds = _dataset(c.dataset, split, c.image_size, c.seed, c.data_dir, c.download)
    if limit is not None and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, range(limit))
    if isinstance(ds, CropStream):  # a stream's copy: set_epoch must not touch the cached one
        ds = copy.copy(ds)
    return IndexedDataset(ds)


def training_probe(train_set: IndexedDataset, count: int) -> IndexedDataset:
    """``count`` training crops the same for every epoch: a stream's draw at
    :data:`PROBE_EPOCH` (never trained on), else the first ``count`` training images."""
    base = train_set.base
    if isinstance(base, CropStream):
        return IndexedDataset(base.fixed(min(count, len(base)), PROBE_EPOCH))
    return IndexedDataset(Subset(base, range(min(count, len(base)))))


def first_images(dataset: IndexedDataset, limit: int | None = None) -> Tensor:
    """The first ``min(limit or INIT_IMAGES, len)`` images, ``(N, 3, H, W)`` in [0, 1]; of
    streamed crops without ``limit``, :data:`INIT_IMAGES` whatever an epoch holds (the items of
    epochs 0, 1, ... in order), so a short epoch does not starve the models' PCA start."""
    base = dataset.base
    if limit is None and isinstance(base, CropStream):
        return torch.stack([base.crop(*item) for item in _items(base)]).float().div_(255.0)
    n = min(INIT_IMAGES if limit is None else limit, len(dataset))
    return torch.stack([dataset[i][1] for i in range(n)])


def first_photos(dataset: IndexedDataset) -> Tensor | None:
    """``(N,)`` the photograph each of ``first_images(dataset)`` is cut from (streamed crops)."""
    base = dataset.base
    return torch.tensor([base.photo(*it) for it in _items(base)]) if isinstance(
        base, CropStream) else None


def _items(stream: CropStream) -> list[tuple[int, int]]:  # (index, epoch) of first_images
    return [(i % stream.num_crops, i // stream.num_crops) for i in range(INIT_IMAGES)]


class TeacherCache:
    """The frozen teacher's outputs for every index of a dataset, fp16 on the CPU: ``mu``,
    ``logvar`` ``(N, teacher_dim, H/8, W/8)``, ``reconstruction`` ``(N, 3, H, W)``."""

    def __init__(self, *tensors: Tensor) -> None:
        self.tensors = tensors

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, dataset: IndexedDataset, batch_size: int,
              device: torch.device, desc: str = "teacher cache",
              show: bool = True) -> TeacherCache:
        """Run ``teacher`` (in eval mode) over ``dataset`` in order."""
        teacher.eval()
        parts = []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for _, x in tqdm(loader, desc=desc, leave=False, disable=None if show else True):
            t = teacher_targets(teacher, x.to(device))
            parts.append([v.half().cpu() for v in t])
        return cls(*(torch.cat(t) for t in zip(*parts, strict=True)))

    def lookup(self, index: Tensor, device: torch.device) -> TeacherTargets:
        """The cached targets of dataset indices ``index`` (B,), float32 on ``device``."""
        return TeacherTargets(*(t[index].to(device).float() for t in self.tensors))


# ================================================================ optimisation

def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: int) -> LRScheduler:
    """Stepped once per optimizer step: the rate of step ``k`` is ``lr * (k + 1) / W`` for
    ``k < W = warmup_steps``, then ``lr * (1 + cos(pi * (k - W) / (total_steps - W))) / 2``
    (0 at ``total_steps``). ``W <= 1``: no warm-up; the warm-up is never shortened."""
    decay = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=0.0)
    if warmup_steps <= 1:
        return decay
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0,
                      total_iters=warmup_steps - 1)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])


def precision(config: DistillConfig, device: torch.device) -> str:
    """``off``, ``bf16`` or ``fp16`` (``auto``: fp16 on CUDA, off on CPU)."""
    mode = config.mixed_precision
    return ("fp16" if device.type == "cuda" else "off") if mode == "auto" else mode


def autocast(config: DistillConfig, device: torch.device) -> AbstractContextManager[Any]:
    """The autocast context of a forward pass and loss (a no-op when precision is off)."""
    mode = precision(config, device)
    if mode == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def make_scaler(config: DistillConfig, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 on CUDA."""
    return torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and precision(config, device) == "fp16")


class WeightAverage:
    """EMA of ``module``'s parameters and buffers (Polyak averaging, ``decay`` in (0, 1)):
    validation and every saved model use the average (:meth:`applied`), training continues
    from the raw weights, which ``*_last.pth`` also carries (``train_state_dict``)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = module
        self.averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                      use_buffers=True)

    @torch.no_grad()
    def update(self) -> None:
        self.averaged.update_parameters(self.module)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in ``module`` for the block, the raw ones back afterwards."""
        raw = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.averaged.module.state_dict())
        try:
            yield
        finally:
            self.module.load_state_dict(raw)

    def train_payload(self) -> dict[str, Any]:
        """The raw weights and the number of updates (CPU tensors)."""
        return {"train_state_dict": {k: v.detach().cpu().clone()
                                     for k, v in self.module.state_dict().items()},
                "ema_updates": int(self.averaged.n_averaged.item())}

    @torch.no_grad()
    def restore(self, payload: dict[str, Any]) -> None:
        """After the averaged weights were loaded into ``module``: make them the average again and
        put the raw weights (``train_state_dict``) back."""
        self.averaged.module.load_state_dict(self.module.state_dict())
        self.averaged.n_averaged.fill_(int(payload.get("ema_updates", 1)))
        if "train_state_dict" in payload:
            self.module.load_state_dict(payload["train_state_dict"])


class LastGoodState:
    """A copy of ``module``'s floating-point tensors and ``optimizer``'s per-parameter state, to
    undo a step that made any of them non-finite (:meth:`restore` also drops state the step
    created). :meth:`save` runs every step: it copies into the buffers of the last save, and
    allocates them again only when the layout changes (the first step)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer
        self._copy: list[Tensor] = []
        self._items: list[tuple[Any, str, Any]] = []  # (param, key, value or None: a tensor)

    def _module_tensors(self) -> list[Tensor]:
        return [t.detach() for t in (*self.module.parameters(), *self.module.buffers())
                if t.is_floating_point()]

    @torch.no_grad()
    def save(self) -> None:
        items = [(p, k, v) for p, entry in self.optimizer.state.items() for k, v in entry.items()]
        live = self._module_tensors() + [v for _, _, v in items if isinstance(v, Tensor)]
        if [(t.shape, t.dtype, t.device) for t in live] == [
                (t.shape, t.dtype, t.device) for t in self._copy]:
            torch._foreach_copy_(self._copy, live)
        else:
            self._copy = [t.clone() for t in live]
        self._items = [(p, k, None if isinstance(v, Tensor) else v) for p, k, v in items]

    @torch.no_grad()
    def restore(self) -> None:
        module = self._module_tensors()
        torch._foreach_copy_(module, self._copy[:len(module)])
        saved = iter(self._copy[len(module):])
        self.optimizer.state.clear()
        for p, k, v in self._items:
            self.optimizer.state[p][k] = next(saved).clone() if v is None else v

    @torch.no_grad()
    def all_finite(self) -> bool:
        """Whether every floating-point parameter, buffer and optimizer tensor is finite."""
        tensors = self._module_tensors() + [
            v for entry in self.optimizer.state.values() for v in entry.values()
            if isinstance(v, Tensor) and v.is_floating_point()]
        # one sum per tensor, a sixth of the time of isfinite(t).all() (benchmarks/train_step.py
        # finiteness_check_ms): NaN and inf carry through it; finite values summing past 3e38 count
        # as non-finite (weights or moments that large have diverged anyway)
        sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
                .to(tensors[0].device) for t in tensors]
        return not sums or bool(torch.isfinite(torch.stack(sums)).all().item())


# ================================================================ state

@dataclass
class TrainState:
    """Where a phase stands: ``epoch`` completed, ``step_in_epoch`` batches done, this epoch's
    sample-weighted term sums (``running``/``count``) and ``time_s`` before an interruption."""

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
        for k, v in terms.items():
            self.running[k] = self.running.get(k, 0.0) + v * samples
        self.count += samples

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.running.items()}

    def reset_epoch(self) -> None:
        self.running, self.count, self.time_s, self.good_steps = {}, 0, 0.0, 0


#: Keys of the resumable ``*_last.pth`` only (the training state and the position in the
#: epoch): deployable checkpoints leave them out.
RESUME_ONLY = ("optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict", "rng_state",
               "train_state_dict", "ema_updates", "step_in_epoch", "running", "count", "time_s",
               "good_steps")


def rng_state() -> dict[str, Any]:
    """The torch (CPU, CUDA), NumPy and Python RNG states as tensors, lists and numbers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)],
        "python": [version, list(py_state), gauss]}
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


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rng_fits(state: Any) -> bool:
    """Whether ``state`` can be set as the RNG state (the current one is kept)."""
    saved = rng_state()
    try:
        set_rng_state(state)
        return True
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError):
        return False
    finally:
        set_rng_state(saved)


def _history_ok(history: Any) -> bool:
    return isinstance(history, list) and all(
        isinstance(r, dict) and isinstance(r.get("phase"), str) and _int(r.get("epoch"))
        and isinstance(r.get("train"), dict) and isinstance(r.get("val"), dict) for r in history)


#: What each key of a ``*_last.pth`` must be (the models are checked where they load).
PAYLOAD_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "phase": ("a phase name", lambda v: isinstance(v, str)),
    "running": ("a dict of loss names to numbers", lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and _real(x) for k, x in v.items())),
    "best_psnr": ("a number", _real),
    "time_s": ("a finite number >= 0", lambda v: _real(v) and math.isfinite(v) and v >= 0),
    **{k: ("an integer >= 0", lambda v: _int(v) and v >= 0)
       for k in ("epoch", "step_in_epoch", "global_step", "count", "bad_steps", "good_steps",
                 "ema_updates")},
    "teacher_source": ("a path", lambda v: isinstance(v, str)),
    "history": ("a list of epoch records (dicts with phase, epoch, train, val)", _history_ok),
    "config": ("a dict", lambda v: isinstance(v, dict)),
    "optimizer_state_dict": ("an optimizer state dict (state, param_groups)", lambda v: isinstance(
        v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list)),
    "scheduler_state_dict": ("a dict", lambda v: isinstance(v, dict)),
    "scaler_state_dict": ("a dict", lambda v: isinstance(v, dict)),
    "rng_state": ("a dict whose 'torch' entry is a uint8 tensor and whose 'numpy', 'python' (and "
                  "'cuda') entries are those generators' states", _rng_fits),
}
#: Keys a resumable checkpoint must hold besides the models.
TRAINING_KEYS = ("phase", "history", "config", "optimizer_state_dict", "scheduler_state_dict",
                 "scaler_state_dict", "rng_state")


def check_training_payload(payload: dict[str, Any], source: str) -> None:
    """A ``CheckpointError`` naming the first missing key, or the key, what it must be and what
    it holds, of a ``*_last.pth`` payload."""
    missing = [k for k in TRAINING_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{source} is not a complete training checkpoint: it lacks "
                              f"{', '.join(missing)}")
    for key, (what, ok) in PAYLOAD_CHECKS.items():
        if key in payload and not ok(payload[key]):
            text = repr(payload[key])
            raise CheckpointError(f"{source}: {key} must be {what}, got "
                                  f"{type(payload[key]).__name__} {text[:60]}"
                                  f"{'...' if len(text) > 60 else ''}")


# ================================================================ the phases

@dataclass
class PhaseContext:
    """What a phase may use of the run (``reduce(values, count)``: the cross-rank mean)."""

    config: DistillConfig
    device: torch.device
    train_set: IndexedDataset
    val_set: IndexedDataset
    val_loader: DataLoader
    reduce: Callable[[dict[str, float], int], dict[str, float]]
    #: Other validation sets by name: ``train`` (:func:`training_probe`), maybe ``unseen``.
    probes: dict[str, DataLoader] = field(default_factory=dict)
    message: Callable[[str], None] = print
    show_progress: bool = True


def pooled_psnr(values: dict[str, float]) -> dict[str, float]:
    """``values`` with each of :data:`PSNR_KEYS` turned from a pooled MSE into a PSNR (dB)."""
    return {k: psnr_from_mse(v) if k in PSNR_KEYS and math.isfinite(v) else v
            for k, v in values.items()}


class Phase:
    """One training phase: what trains (``model``: ``vae``, the likelihood scale, maybe
    ``adapter``), its loss, validation and files; ``vae`` is saved under ``role``."""

    criterion: DistillLoss | None = None
    name = ""
    role = "student"
    last_file = best_file = ""
    epoch_file: str | None = None
    #: The phase's best file is the previous phase's (fine-tuning): the loop starts from the
    #: previous best value and commits its start before its first step.
    inherits_best = False
    trains_adapter = False
    vae: VAEBase
    model: nn.Module
    adapter: LatentAdapter | None = None
    teacher: VAEBase | None = None
    train_cache: TeacherCache | None = None
    val_cache: TeacherCache | None = None
    perceptual_name, teacher_source = "none", ""

    def __init__(self, ctx: PhaseContext, epochs: int) -> None:
        self.ctx, self.epochs = ctx, epochs
        self._pictures: tuple[int, list[tuple[str, Tensor]]] | None = None
        #: The frozen teacher's validation values of each batch (by its first index), computed
        #: at the phase's first validation: the teacher and the crops stay through a phase.
        self._teacher_values: dict[int, dict[str, float]] = {}

    def trainable(self) -> nn.Module:
        return self.model

    def init_fresh(self) -> None:
        self.refit()  # once on a fresh run, after the fresh models' ``init_from_data``

    @functools.cached_property
    def fit_set(self) -> tuple[tuple[Tensor, ...], Tensor, Tensor | None]:
        """Batches of :func:`first_images`, the teacher's latents of them and, for streamed
        crops, the photograph each is cut from."""
        x = first_images(self.ctx.train_set).to(self.ctx.device).split(256)
        return x, torch.cat([self.teacher.encode(b) for b in x]), first_photos(self.ctx.train_set)

    @torch.no_grad()
    def refit(self) -> dict[str, Tensor] | None:
        """Fit the adapter (no gradient) to :attr:`fit_set` (``LatentAdapter.fit``): its state,
        or None (no teacher; non-finite z)."""
        if self.teacher is None or not self.trains_adapter:
            return None
        x, teacher_mu, photos = self.fit_set
        if not (z := torch.cat([self.vae.encode(b) for b in x])).isfinite().all():
            return None
        self.adapter.fit(z, teacher_mu, photos)
        return {k: v.clone() for k, v in self.adapter.state_dict().items()}

    def calibrate(self) -> None:
        """Start the likelihood scale at the model's RMS error on the first training images."""
        if self.criterion is None:
            return
        images = first_images(self.ctx.train_set).to(self.ctx.device)
        sigma = self.criterion.calibrate(self.trainable().model, images)
        self.ctx.message(f"[{self.name}] likelihood scale: sigma = {sigma:.4g} (the sampled "
                         f"reconstruction's RMS error on {len(images)} training images)")

    def after_step(self, terms: dict[str, Tensor]) -> None:
        """After a kept step: a rate target follows the KL in bits per pixel (mean over
        ranks)."""
        if self.criterion is not None and self.criterion.rate is not None:
            kl = self.ctx.reduce({"kl": float(terms["bpp"])}, 1)["kl"]
            self.criterion.after_step(kl)

    def term_shares(self, module: nn.Module, index: Tensor, x: Tensor
                    ) -> tuple[dict[str, float], dict[str, float]]:
        """Each weighted term's share of the objective and of its gradient norm on one batch."""
        if self.criterion is None:
            return {}, {}
        weighted = self.criterion.weighted(self.loss(module, index, x))
        return value_shares(weighted), gradient_shares(weighted, list(module.parameters()))

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.trainable().parameters() if p.requires_grad]}]

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        """Parameters whose gradients are dropped before each optimizer step of ``epoch``."""
        return []

    def set_train_mode(self, epoch: int) -> None:
        self.trainable().train()

    def targets(self, index: Tensor, x: Tensor, cache: TeacherCache | None
                ) -> TeacherTargets | None:
        """The teacher's outputs for a batch: from ``cache`` if given, else computed."""
        if self.teacher is None:
            return None
        return cache.lookup(index, self.ctx.device) if cache is not None else teacher_targets(
            self.teacher, x)

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        """The terms and ``"total"`` of a batch (``index`` (B,), ``x`` (B, 3, H, W) in [0, 1])
        through ``module`` (:meth:`trainable`, maybe DDP-wrapped)."""
        out, adapted = module(x)
        return self.criterion(x, out, adapted, self.targets(index, x, self.train_cache))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation metrics (the same on every rank) on the held-out set: the loss terms,
        ``psnr`` (decode of mu), ``psnr_sample`` (decode of a seeded posterior sample), the rate
        ``bpp`` (bits per pixel) and ``kl_per_element`` (nats), SSIM; with a teacher its
        ``teacher_psnr``, ``teacher_psnr_sample``, ``teacher_bpp``, SSIM, latent CKA and
        ``cross_psnr``; then ``{name}_psnr`` of each other set (``train``, ``unseen``). The
        teacher's own values are those of the phase's first validation."""
        self.vae.eval()
        latents: dict[str, list[Tensor]] = {"student": [], "adapted": [], "teacher": []}

        def batch(index: Tensor, x: Tensor) -> dict[str, float]:
            x = x.to(self.ctx.device)
            out = self.vae(x)
            adapted = None if self.adapter is None else adapt(self.adapter, out.mu, out.logvar)
            teach = self.targets(index, x, self.val_cache)
            values = {k: v.item() for k, v in self.criterion(x, out, adapted, teach).items()}
            values.update(rate_and_sample(self.vae, x, index, out.mu, out.logvar))
            values.update(psnr=mse(out.reconstruction, x), ssim=ssim(out.reconstruction, x))
            if teach is not None and adapted is not None:
                if (first := int(index[0])) not in self._teacher_values:
                    rate = rate_and_sample(self.teacher, x, index, teach.mu, teach.logvar)
                    self._teacher_values[first] = {
                        "teacher_psnr": mse(teach.reconstruction, x),
                        "teacher_psnr_sample": rate["psnr_sample"],
                        "teacher_bpp": rate["bits_per_pixel"],
                        "teacher_ssim": ssim(teach.reconstruction, x)}
                values.update(self._teacher_values[first],
                              cross_psnr=mse(self.teacher.decode(adapted[0]), x))
                for key, z in (("student", out.mu), ("adapted", adapted[0]),
                               ("teacher", teach.mu)):
                    latents[key].append(z.float().cpu())
            return values

        values, count = mean_over(self.ctx.val_loader, batch)
        if latents["teacher"] and count >= 2:
            teacher_mu = torch.cat(latents["teacher"])
            values["cka"] = linear_cka(torch.cat(latents["adapted"]), teacher_mu)
            values["cka_raw"] = linear_cka(torch.cat(latents["student"]), teacher_mu)
        values["bpp"] = values.pop("bits_per_pixel")
        values = pooled_psnr(self.ctx.reduce(values, count))
        for name, loader in self.ctx.probes.items():
            probe, n = mean_over(loader, lambda index, x: {
                "psnr": mse(self.vae(x.to(self.ctx.device)).reconstruction,
                            x.to(self.ctx.device))})
            values[f"{name}_psnr"] = pooled_psnr(self.ctx.reduce(probe, n))["psnr"]
        return values

    def model_payload(self) -> dict[str, Any]:
        extra = {} if self.adapter is None else {
            "adapter_state_dict": to_cpu(self.adapter.state_dict()),
            "adapter_arch": self.adapter.arch_config(),
            "perceptual_backbone": self.perceptual_name, "teacher_source": self.teacher_source}
        return {**model_entry(self.vae, self.role), **extra, **self.criterion.scale_payload()}

    def load_models(self, payload: dict[str, Any], source: str) -> None:
        for role, module in ((self.role, self.vae), ("adapter", self.adapter)):
            if module is not None:
                load_state_checked(module, payload[f"{role}_state_dict"], f"{source} ({role})")
        self.criterion.load_scale(payload, source)

    def picture_rows(self) -> list[tuple[str, Tensor]]:
        """Labelled rows of the reconstruction grid, each ``(n, 3, H, W)`` in [0, 1]."""
        x = first_images(self.ctx.val_set, GRID_IMAGES).to(self.ctx.device)
        with torch.no_grad():
            rows = [("input", x)]
            if self.teacher is not None:
                rows.append(("teacher", self.teacher.eval()(x).reconstruction))
            rec = self.vae.eval()(x).reconstruction
        return rows + [(self.role, rec), ("error x10", error_image(rec, x))]

    def epoch_picture_rows(self, epoch: int) -> list[tuple[str, Tensor]]:
        """:meth:`picture_rows` of ``epoch``, computed once for every writer."""
        if self._pictures is None or self._pictures[0] != epoch:
            self._pictures = (epoch, self.picture_rows())
        return self._pictures[1]


class TeacherPhase(Phase):
    """Phase 1: the teacher VAE alone with recon + KL."""

    name = role = "teacher"
    last_file, best_file = "teacher_last.pth", "teacher_best.pth"

    def __init__(self, ctx: PhaseContext, teacher: VAEBase, epochs: int) -> None:
        super().__init__(ctx, epochs)
        self.vae, self.criterion = teacher, DistillLoss.vae(ctx.config)
        self.model = Trainable(teacher, self.criterion.scale)


class DistillPhase(Phase):
    """Phase 2: student + adapter against the frozen teacher with the five-term loss
    (``teacher`` None: the student alone, the distillation weights 0)."""

    name = "distill"
    last_file, best_file, epoch_file = ("tinyvae_last.pth", "tinyvae_best.pth",
                                        "tinyvae_epoch_{epoch:03d}.pth")
    trains_adapter = True

    def __init__(self, ctx: PhaseContext, epochs: int, student: VAEBase, adapter: LatentAdapter,
                 teacher: VAEBase | None, loss: DistillLoss, perceptual_name: str = "none",
                 teacher_source: str = "") -> None:
        super().__init__(ctx, epochs)
        self.vae, self.adapter, self.teacher, self.criterion = student, adapter, teacher, loss
        self.perceptual_name, self.teacher_source = perceptual_name, teacher_source
        self.model = Trainable(student, loss.scale, adapter if self.trains_adapter else None)
        adapter.requires_grad_(False)  # refitted by least squares after each epoch

    def prepare(self) -> None:
        """Build the teacher caches (with a teacher and ``teacher_cache``)."""
        if self.teacher is None or not self.ctx.config.teacher_cache:
            return
        ctx, start = self.ctx, time.perf_counter()
        bs = max(ctx.config.batch_size, 64)
        sets = {"val": ctx.val_set} if ctx.config.crops == "stream" else {
            "train": ctx.train_set, "val": ctx.val_set}  # streamed crops: on the fly
        caches = {split: TeacherCache.build(self.teacher, ds, bs, ctx.device,
                                            f"teacher cache ({split})", ctx.show_progress)
                  for split, ds in sets.items()}
        self.train_cache, self.val_cache = caches.get("train"), caches["val"]
        size = sum(t.nbytes for c in caches.values() for t in c.tensors)
        ctx.message(f"teacher cache: {sum(len(ds) for ds in sets.values())} images in "
                    f"{time.perf_counter() - start:.1f}s, {size / 2**20:.0f} MiB")


class FinetunePhase(DistillPhase):
    """Phase 3: the student alone (recon, KL, perceptual), decoder first, the encoder from half
    the epochs on; it shares ``tinyvae_best.pth`` with the distillation (``inherits_best``)."""

    name = "finetune"
    last_file, best_file, epoch_file = "tinyvae_finetune_last.pth", DistillPhase.best_file, None
    inherits_best = True
    trains_adapter = False

    @property
    def unfreeze_epoch(self) -> int:
        """The first epoch (0-based) that trains the encoder."""
        return self.epochs // 2

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.vae.decoder.parameters())},
                {"params": list(self.vae.encoder.parameters())},
                {"params": list(self.criterion.scale.parameters())}]

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        return list(self.vae.encoder.parameters()) if epoch < self.unfreeze_epoch else []

    def set_train_mode(self, epoch: int) -> None:
        self.model.train()
        if epoch < self.unfreeze_epoch:
            self.vae.encoder.eval()

    def loss(self, module: nn.Module, index: Tensor, x: Tensor) -> dict[str, Tensor]:
        return self.criterion(x, module(x)[0], None, None)


# ================================================================ one phase: epochs and steps

class PhaseLoop:
    """Trains ``phase`` on ``loader`` (``(index, images)`` batches), writes its files on rank 0,
    reports through ``emit(hook, *args)``, stops on ``stop_signal()``; ``best``: the validation
    PSNR an epoch must beat."""

    def __init__(self, phase: Phase, *, ctx: DistContext, loader: DataLoader,
                 history: list[dict[str, Any]], emit: Callable[..., None],
                 stop_signal: Callable[[], str | None], best: float = -math.inf) -> None:
        config = phase.ctx.config
        self.phase, self.config, self.ctx, self.loader = phase, config, ctx, loader
        self.history, self.emit, self.stop_signal = history, emit, stop_signal
        self.out_dir = Path(config.checkpoint_dir)
        self.module = phase.trainable()
        self.memory_format = (torch.channels_last if config.channels_last
                              else torch.contiguous_format)
        if config.channels_last:  # the frozen teacher's pass too: 1.2-1.4x on a CPU in bf16
            for model in (self.module, phase.teacher):
                if model is not None:
                    model.to(memory_format=self.memory_format)
        phase.calibrate()  # before the DDP wrapper (rank 0's value) and the weight average
        self.wrapped = wrap_ddp(self.module, ctx)
        self.optimizer = make_optimizer(phase.param_groups(), config, ctx.device)
        steps_per_epoch = max(1, math.ceil(len(loader) / config.grad_accum_steps))
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps,
                                         phase.epochs * steps_per_epoch)
        self.scaler = make_scaler(config, ctx.device)
        self.average = (WeightAverage(self.module, config.ema_decay)
                        if config.ema_decay > 0 else None)
        self.state = TrainState(best_psnr=best)
        self.restored = False
        self.current_epoch = 0
        self.consecutive_bad = 0
        self._bad_kinds: set[str] = set()
        self.last_good = LastGoodState(self.module, self.optimizer)
        self._save_due = True  # copy the state before the next window's first forward pass
        self._started = 0.0

    def run(self) -> None:
        """Train from the current state to the last epoch (or early stop)."""
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

    def _any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is set on any rank (the same answer on every rank)."""
        return reduce_mean({"flag": float(flag)}, self.ctx, 1)["flag"] > 0.0

    def _train_epoch(self, epoch: int) -> None:
        self.current_epoch = epoch
        set_epoch(self.loader, epoch)
        self.phase.set_train_mode(epoch)
        skip = self.state.step_in_epoch  # batches a resumed epoch already did
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
                self.state.time_s = time.perf_counter() - self._started
                self.emit("on_interrupt", self.phase)
                self.save([self.phase.last_file])
                barrier(self.ctx)
                raise TrainingInterrupted(self.stop_signal() or "a signal on another rank",
                                          self.out_dir / self.phase.last_file
                                          if self.ctx.is_main else None)

    def _train_batch(self, epoch: int, step: int, index: Tensor, x: Tensor) -> bool:
        """Forward and backward one batch, an optimizer step at the end of an accumulation
        window; returns whether this batch ended the window."""
        if self._save_due:
            self.last_good.save()
            self._save_due = False
        x = x.to(self.ctx.device, non_blocking=True, memory_format=self.memory_format)
        with autocast(self.config, self.ctx.device):
            terms = self.phase.loss(self.wrapped, index, x)
        finite = not self._any_rank(not bool(torch.isfinite(terms["total"]).item()))
        boundary = (step + 1) % self.config.grad_accum_steps == 0 or step + 1 == len(self.loader)
        if not finite:  # the forward pass may have left non-finite BatchNorm statistics
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
        """One optimizer step; False (undone) when it left a non-finite tensor on any rank."""
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

    def _diverged(self, what: str) -> TrainingDiverged:
        """The error of a run that diverged (``what``), naming the checkpoint it leaves."""
        path = self.out_dir / self.phase.last_file
        left = (f"The last good checkpoint is {path}" if path.is_file() else
                f"No checkpoint of this phase was written ({path} does not exist)")
        return TrainingDiverged(f"{what}; stopped. {left} (lower --lr or check the data)")

    def _bad_step(self, epoch: int, step: int, kind: str) -> None:
        """Count a bad step (``kind`` ``loss`` or ``weights``) and drop its gradients."""
        self.state.bad_steps += 1
        self.consecutive_bad += 1
        self._bad_kinds.add(kind)
        self.optimizer.zero_grad(set_to_none=True)
        what, action = (("non-finite loss", "step skipped") if kind == "loss" else
                        ("non-finite weights after the optimizer step", "step undone"))
        self.emit("on_message", f"[{self.phase.name}] {what} at epoch {epoch + 1} "
                  f"batch {step}: {action} ({self.consecutive_bad} in a row)")
        if self.consecutive_bad >= self.config.max_bad_steps:
            subject = {frozenset({"loss"}): "the loss was",
                       frozenset({"weights"}): "the weights became"}.get(
                frozenset(self._bad_kinds), "the loss or the weights were")
            raise self._diverged(f"{subject} non-finite {self.consecutive_bad} times in a row "
                                 f"(epoch {epoch + 1}, batch {step})")

    # ---------------------------------------------------------------- validation, commit
    def _finish_epoch(self, epoch: int) -> None:
        """Validate, record the epoch, let the callbacks see it, commit."""
        if self.state.good_steps == 0:
            raise self._diverged(f"epoch {epoch + 1} of the {self.phase.name} phase kept no "
                                 f"optimizer step ({self.state.bad_steps} bad steps so far: "
                                 "non-finite loss or weights)")
        elapsed, count = time.perf_counter() - self._started, self.state.count
        train = reduce_mean(self.state.means(), self.ctx, count)
        with self.average.applied() if self.average is not None else nullcontext():
            fitted = self.phase.refit()  # to the weights validated and saved
            val = self.phase.validate()
        if fitted is not None and self.average is not None:  # into the raw weights too
            self.phase.adapter.load_state_dict(fitted)
            self.average.averaged.module.adapter.load_state_dict(fitted)
        bad = [name for key, name in (("total", "loss"), ("psnr", "reconstruction error"),
                                      ("cross_psnr", "cross-decoding error"))
               if key in val and not math.isfinite(val[key])]
        if bad:
            raise self._diverged(f"validation after epoch {epoch + 1} gave a non-finite "
                                 f"{' and '.join(bad)}: the weights diverged")
        value_share, gradient_share = self._term_shares()
        is_best = val[BEST_METRIC] > self.state.best_psnr  # strictly: ties keep the earlier
        record = {"phase": self.phase.name, "epoch": epoch + 1, "train": train, "val": val,
                  "time_s": elapsed, "train_img_per_s": count * self.ctx.world_size / elapsed,
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
        self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        self.state.reset_epoch()
        self.emit("on_epoch_end", self.phase, record)
        # the commit: history.json, the snapshot, the best file, then *_last.pth
        if self.ctx.is_main:
            write_json(self.history, self.out_dir / "history.json")
        names = []
        if self.phase.epoch_file and record["epoch"] % self.config.save_interval == 0:
            names.append(self.phase.epoch_file.format(epoch=record["epoch"]))
        if is_best:
            names.append(self.phase.best_file)
        self.save([*names, self.phase.last_file])
        barrier(self.ctx)
        self.phase.set_train_mode(epoch)

    def _term_shares(self) -> tuple[dict[str, float], dict[str, float]]:
        """Each term's share of the objective and its gradient on the first training batch."""
        x = first_images(self.phase.ctx.train_set, self.config.batch_size).to(
            self.ctx.device, memory_format=self.memory_format)
        devices = [self.ctx.device.index or 0] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), autocast(self.config, self.ctx.device):
            self.phase.set_train_mode(self.current_epoch)
            return self.phase.term_shares(self.module, torch.arange(len(x)), x)

    def epochs_without_best(self) -> int:
        """How many of this phase's latest epochs in a row did not beat the best before them."""
        flags = [r["is_best"] for r in self.history if r["phase"] == self.phase.name]
        return len(flags) - (max(i for i, best in enumerate(flags) if best) + 1 if any(flags)
                             else 0)

    def patience_spent(self) -> bool:
        patience = self.config.early_stop_patience
        return patience is not None and self.epochs_without_best() >= patience

    def payload(self) -> dict[str, Any]:
        """The resumable state of the phase (the models hold the averaged weights)."""
        if self.average is None:
            models = self.phase.model_payload()
        else:
            with self.average.applied():  # clone: the payload's CPU tensors alias the module
                models = copy.deepcopy(self.phase.model_payload())
            models.update(self.average.train_payload())
        return {"phase": self.phase.name, **models, **asdict(self.state),
                "history": self.history, "config": self.config.model_dump(),
                "optimizer_state_dict": self.optimizer.state_dict(),
                "scheduler_state_dict": self.scheduler.state_dict(),
                "scaler_state_dict": self.scaler.state_dict(), "rng_state": rng_state()}

    def save(self, names: list[str]) -> None:
        """Write the phase's state to each of ``names`` (rank 0, in order, non-finite refused):
        ``*_last.pth`` whole, the others without :data:`RESUME_ONLY`."""
        if not self.ctx.is_main:
            return
        payload = self.payload()
        deployable = {k: v for k, v in payload.items() if k not in RESUME_ONLY}
        for name in names:
            save_checkpoint(payload if name == self.phase.last_file else deployable,
                            self.out_dir / name, require_finite=True)


# ================================================================ the run

def make_optimizer(params: Any, config: DistillConfig, device: torch.device) -> AdamW:
    """AdamW at the config's learning rate and weight decay, the fused kernel on CPU and CUDA
    (``python benchmarks/train_step.py``)."""
    return AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                 fused=device.type in ("cpu", "cuda"))


def configured_model(config: DistillConfig, role: str) -> VAEBase:
    """A fresh ``role`` (``student``/``teacher``) model of ``config``: its registry model with
    the role's size fields it takes, and ``image_size`` as a compact model's crop side."""
    c = config
    if role == "student":
        name, arch = c.student_model, {"latent_dim": c.student_latent_dim,
                                       "base_channels": c.student_base_channels}
    else:
        name, arch = c.teacher_model, {"latent_dim": c.teacher_latent_dim,
                                       "base_channels": c.teacher_base_channels,
                                       "blocks_per_stage": c.teacher_blocks_per_stage}
    if issubclass(MODELS[name], CompactVAE):
        arch["image_size"] = c.image_size
    takes = inspect.signature(MODELS[name]).parameters
    return build_model(name, **{k: v for k, v in arch.items() if k in takes})


#: Config fields a resumed run may change (how long, where it runs and writes, what it logs);
#: every other field shapes the run and must equal the checkpoint's.
RESUME_MAY_CHANGE = frozenset({
    "teacher_epochs", "epochs", "finetune_epochs", "early_stop_patience", "device",
    "num_workers", "data_dir", "download", "vgg16_weights", "teacher_cache", "max_bad_steps",
    "checkpoint_dir", "save_interval", "log_interval", "tensorboard"})
#: The flag of each phase's epoch count.
EPOCH_FLAGS = {"teacher": "--teacher-epochs", "distill": "--epochs",
               "finetune": "--finetune-epochs"}


def find_resume(checkpoint_dir: str | Path) -> Path | None:
    """What ``--resume auto`` continues: the latest phase's ``*_last.pth``, or None."""
    for phase in (FinetunePhase, DistillPhase, TeacherPhase):
        path = Path(checkpoint_dir) / phase.last_file
        if path.is_file():
            return path
    return None


def config_differences(stored: dict[str, Any], config: DistillConfig) -> list[str]:
    """``"field: checkpoint X, now Y"`` for each field outside :data:`RESUME_MAY_CHANGE` that
    differs (a field the stored config lacks counts with its default)."""
    now = config.model_dump()
    show = lambda v: repr(v) if isinstance(v, str) else str(v)  # noqa: E731
    return [f"{name}: checkpoint {show(stored.get(name, f.default))}, now {show(now[name])}"
            for name, f in DistillConfig.model_fields.items()
            if name not in RESUME_MAY_CHANGE and stored.get(name, f.default) != now[name]]


class Distiller:
    """Runs the phases of ``config``; ``callbacks`` come after the default ones (rank 0 only),
    ``console`` shows the progress bar and console log."""

    def __init__(self, config: DistillConfig, callbacks: Sequence[Callback] = (),
                 ctx: DistContext | None = None, console: bool = True) -> None:
        self.config = c = config
        self.ctx = ctx or init_distributed(config.device)
        self.device = self.ctx.device
        self.callbacks = ([*default_callbacks(console, tensorboard=c.tensorboard), *callbacks]
                          if self.ctx.is_main else [])
        self.out_dir = Path(c.checkpoint_dir)
        self.history: list[dict[str, Any]] = []
        self.stop_signal: str | None = None
        self.loop: PhaseLoop | None = None
        random.seed(c.seed)
        np.random.seed(c.seed)
        torch.manual_seed(c.seed)
        self.student = configured_model(c, "student").to(self.device)
        self.adapter = LatentAdapter(c.student_latent_dim, c.teacher_latent_dim,
                                     vector=len(self.student.latent_shape()) == 1
                                     ).to(self.device)
        self.teacher: VAEBase | None = None
        self.teacher_source = ""
        self.resume_source = ""
        self.perceptual_name = "none"
        #: The perceptual backbone (``auto`` resolved here) or ``"none"``.
        self.perceptual_kind = (resolve_backbone(c.perceptual_backbone, c.vgg16_weights,
                                                 c.download) if c.perceptual_weight > 0
                                else "none")
        self.teacher_needed = (c.distill_latent_weight > 0 or c.distill_recon_weight > 0
                               or self.perceptual_kind == "teacher")

    def message(self, text: str) -> None:
        """Print ``text`` on rank 0 (through the callbacks)."""
        self._emit("on_message", text)

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    @property
    def current_epoch(self) -> int:
        return self.loop.current_epoch if self.loop is not None else 0

    def run(self, resume: str | Path | None = None, force_resume: bool = False
            ) -> dict[str, Path]:
        """Run the phases, continuing ``resume`` (a ``*_last.pth`` or ``"auto"``); returns the
        files (``best``, ``last``, ``teacher``, ``history``, ``config``)."""
        c = self.config
        # One writer per folder: rank 0 holds the lock for the whole run, before it reads a
        # checkpoint to resume, deletes temporaries or writes the effective config.
        with FolderLock(self.out_dir, "training") if self.ctx.is_main else nullcontext() as lock:
            payload = self._read_resume(resume, force_resume)
            start = PHASES.index(payload["phase"]) if payload else 0
            self.train_set, self.val_set = build_split(c, "train"), build_split(c, "val")
            loader_args = {"ctx": self.ctx, "seed": c.seed, "num_workers": c.num_workers}
            self.train_loader = make_loader(self.train_set, c.batch_size, shuffle=True,
                                            drop_last=len(self.train_set) > c.batch_size,
                                            **loader_args)
            val_loader = make_loader(self.val_set, c.batch_size, shuffle=False, **loader_args)
            probes = {"train": training_probe(self.train_set, len(self.val_set))}
            if c.unseen_dataset is not None:
                probes["unseen"] = build_split(c, "unseen")
            self.phase_context = PhaseContext(
                c, self.device, self.train_set, self.val_set, val_loader,
                reduce=lambda values, count: reduce_mean(values, self.ctx, count),
                probes={name: make_loader(ds, c.batch_size, shuffle=False, **loader_args)
                        for name, ds in probes.items()},
                message=self.message, show_progress=self.ctx.is_main)
            teacher_path = self._teacher_path(payload)
            if teacher_path is not None:
                self.teacher = self._load_teacher(teacher_path)
            elif self.teacher_needed and c.teacher_epochs == 0:
                raise ValueError("the loss needs a teacher but none was given "
                                 "(--teacher-checkpoint) or found in checkpoint_dir, and "
                                 "teacher_epochs is 0")
            # every input is checked: from here on the folder is written
            if lock is not None:
                stale = lock.remove_stale_temporaries()
                if stale:
                    self.message(f"removed {len(stale)} temporary file(s) of an interrupted "
                                 f"write in {self.out_dir}")
                save_config(c, self.out_dir / "config.json")
            self._emit("on_train_begin")
            try:
                with self._signal_handlers():
                    self._run_phases(payload, start)
            finally:
                self._emit("on_train_end")
        return {"best": self.out_dir / DistillPhase.best_file,
                "last": self.out_dir / DistillPhase.last_file,
                **({"teacher": Path(self.teacher_source)} if self.teacher_source else {}),
                "config": self.out_dir / "config.json", "history": self.out_dir / "history.json"}

    def _run_phases(self, payload: dict[str, Any] | None, start: int) -> None:
        c = self.config
        if self.teacher is None and self.teacher_needed:
            self.teacher = self._pretrain_teacher(payload if start == 0 else None)
        if self.teacher is not None:
            self.message(f"teacher: loaded {self.teacher_source} "
                         f"({self.teacher.num_parameters():,} parameters)")
            self.teacher.requires_grad_(False).eval()
        loss = self.build_loss()
        self.message(f"perceptual backbone: {self.perceptual_name}; distillation "
                     f"{'from the teacher' if loss.needs_teacher else 'off'}; "
                     f"device {self.device}, world size {self.ctx.world_size}")
        distill = self._student_phase(DistillPhase, c.epochs, loss)
        if start <= 1:
            distill.prepare()
            self._fit(distill, payload if start == 1 else None, fresh=[self.student],
                      teacher=self.teacher if loss.needs_teacher else None)
        if c.finetune_epochs == 0:
            return
        finetune = self._student_phase(FinetunePhase, c.finetune_epochs,
                                       self.build_loss(distill=False))
        incumbent = -math.inf  # a resumed fine-tuning takes it from its payload
        if start <= 1:  # start from the best distilled student
            path = self.out_dir / DistillPhase.best_file
            best = load_checkpoint(path)
            if best.get("phase") != "distill" or not _real(best.get("best_psnr")):
                raise CheckpointError(f"{path} is not the best distillation checkpoint (phase "
                                      f"{best.get('phase')!r}) the fine-tuning phase starts "
                                      "from")
            load_state_checked(self.student, best["student_state_dict"], f"{path} (student)")
            incumbent = float(best["best_psnr"])
            finetune.train_cache, finetune.val_cache = distill.train_cache, distill.val_cache
        else:
            finetune.prepare()
        self._fit(finetune, payload if start == 2 else None, fresh=[], best=incumbent)

    def build_loss(self, distill: bool = True) -> DistillLoss:
        """The five-term loss of this config (``distill=False``: the distillation weights 0)."""
        c = self.config
        backbone = None
        if self.perceptual_kind != "none":
            backbone, self.perceptual_name = build_perceptual(
                self.perceptual_kind, self.teacher, c.vgg16_weights, allow_download=c.download)
            backbone = backbone.to(self.device)
        return DistillLoss.from_config(c, backbone, distill=distill)

    def _student_phase(self, kind: type[DistillPhase], epochs: int,
                       loss: DistillLoss) -> DistillPhase:
        return kind(self.phase_context, epochs, self.student, self.adapter, self.teacher, loss,
                    self.perceptual_name, self.teacher_source)

    def _fit(self, phase: Phase, payload: dict[str, Any] | None,
             fresh: Sequence[VAEBase], best: float = -math.inf,
             teacher: VAEBase | None = None) -> None:
        """Train ``phase``, continuing ``payload`` if given; otherwise the ``fresh`` models first
        get ``init_from_data`` on the first training images (and ``teacher``, the model they are
        distilled from) at the run's rate budget. ``best``: the PSNR to beat."""
        if payload is None and fresh:
            images = first_images(self.train_set).to(self.device)
            budget = self.config.kl_target or self.config.kl_free_bits
            for model in fresh:
                model.init_from_data(images, teacher, budget)
            phase.init_fresh()
        self.loop = loop = PhaseLoop(phase, ctx=self.ctx, loader=self.train_loader,
                                     history=self.history, emit=self._emit,
                                     stop_signal=lambda: self.stop_signal, best=best)
        if payload is not None:
            self._resume(loop, payload)
        loop.run()

    # ---------------------------------------------------------------- the teacher
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
        return model.to(self.device)

    def _pretrain_teacher(self, payload: dict[str, Any] | None) -> VAEBase:
        c = self.config
        teacher = configured_model(c, "teacher").to(self.device)
        self.message(f"teacher: pre-training {teacher.num_parameters():,} parameters for "
                     f"{c.teacher_epochs} epochs (phase 1)")
        phase = TeacherPhase(self.phase_context, teacher, c.teacher_epochs)
        self._fit(phase, payload, fresh=[teacher])
        path = self.out_dir / "teacher.pth"
        if self.ctx.is_main:
            best = load_checkpoint(self.out_dir / phase.best_file)
            save_checkpoint({**model_entry(model_from_payload(best, "teacher"), "teacher"),
                             "epoch": best["epoch"], "history": best["history"],
                             "config": c.model_dump()}, path, require_finite=True)
        barrier(self.ctx)
        return self._load_teacher(path)

    # ---------------------------------------------------------------- resume
    def _read_resume(self, resume: str | Path | None, force: bool) -> dict[str, Any] | None:
        """The checked payload of the ``*_last.pth`` to continue (before anything is built or
        written): its keys and their types, then its config against this one."""
        path = find_resume(self.out_dir) if str(resume) == "auto" else resume
        if path is None:
            if resume is not None:
                self.message(f"resume auto: no checkpoint in {self.out_dir}, starting fresh")
            return None
        self.resume_source = source = str(path)
        payload = load_checkpoint(path)
        if payload.get("phase") not in PHASES or "optimizer_state_dict" not in payload:
            raise CheckpointError(f"{source} is not a training checkpoint of this trainer (no "
                                  "phase/optimizer state: resume from a *_last.pth); pass it as "
                                  "--teacher-checkpoint or load it with hrm_vision.io")
        stored = payload.get("config")
        differences = config_differences(stored, self.config) if isinstance(stored, dict) else []
        if differences and not force:
            raise ResumeMismatch(f"{source} was trained with another config: "
                                 f"{'; '.join(differences)} (resume with the checkpoint's "
                                 "values, or pass --force-resume to resume anyway)")
        if differences:
            self.message(f"--force-resume: resuming {source} with {'; '.join(differences)}")
        if payload["phase"] != "teacher":  # the models first: a mismatch names their keys
            for role, model in (("student", self.student), ("adapter", self.adapter)):
                check_fits(model, payload.get(f"{role}_state_dict"), f"{source} ({role})")
        check_training_payload(payload, source)
        return payload

    def _teacher_path(self, payload: dict[str, Any] | None) -> Path | None:
        """The teacher file to load (None: pre-train one, or none is needed):
        ``teacher_checkpoint``, else a resumed phase's ``teacher_source`` (or the ``teacher.pth``
        beside it when the folder moved), else ``checkpoint_dir/teacher.pth``."""
        if payload is not None and payload["phase"] == "teacher":
            return None
        if self.config.teacher_checkpoint:
            return Path(self.config.teacher_checkpoint)
        if payload is None:
            found = self.out_dir / "teacher.pth"
            return found if found.is_file() else None
        named, source = payload.get("teacher_source", ""), self.resume_source
        if not named:
            if self.teacher_needed:
                raise CheckpointError(f"{source} was trained without a teacher, but this run's "
                                      "loss needs one (a perceptual backbone that resolved "
                                      "otherwise?)")
            return None
        beside = Path(source).parent / "teacher.pth"
        if Path(named).is_file():
            return Path(named)
        if Path(named).name == "teacher.pth" and beside.is_file() and Path(named).parent == Path(
                str(payload["config"].get("checkpoint_dir"))):
            return beside
        raise CheckpointError(f"{source}: its {payload['phase']} phase was trained with the "
                              f"teacher {named}, which is not there: put that file back (or pass "
                              "a copy as --teacher-checkpoint FILE with --force-resume)")

    def _resume(self, loop: PhaseLoop, payload: dict[str, Any]) -> None:
        """Continue ``loop`` from its checked ``*_last.pth`` payload. Resumed into a new folder,
        the phase's best file comes along when it is the best the state knows (else the best is
        picked again among the epochs still to train)."""
        source, phase = self.resume_source, loop.phase
        where = f"{source} ({phase.name} phase)"
        phase.load_models(payload, where)
        if loop.average is not None:
            if "train_state_dict" in payload:
                check_fits(loop.module, payload["train_state_dict"], f"{where} (train_state_dict)")
            loop.average.restore(payload)
        bad = non_finite_tensors(payload["optimizer_state_dict"])
        if bad:
            raise CheckpointError(f"{where}: the optimizer state holds NaN or infinite values in "
                                  f"{', '.join(bad[:5])}")
        for key, restore in (("optimizer_state_dict", loop.optimizer.load_state_dict),
                             ("scheduler_state_dict", loop.scheduler.load_state_dict),
                             ("scaler_state_dict", lambda s: s and loop.scaler.load_state_dict(s)),
                             ("rng_state", set_rng_state)):
            try:
                restore(payload[key])
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
                raise CheckpointError(f"{where}: {key} does not fit this run: "
                                      f"{type(exc).__name__}: {exc}") from exc
        known = {f.name for f in fields(TrainState)}
        loop.state = state = TrainState(**{k: v for k, v in payload.items() if k in known})
        loop.history[:] = payload["history"]
        loop.restored = True
        self.message(f"resuming {phase.name} from {source} (epoch {state.epoch}, batch "
                     f"{state.step_in_epoch})")
        done = state.epoch >= phase.epochs
        if done:
            later = {"teacher": "distill", "distill": "finetune" if self.config.finetune_epochs
                     else None}.get(phase.name)
            partial = (f" and {state.step_in_epoch} batches of epoch {state.epoch + 1}"
                       if state.step_in_epoch else "")
            self.message(f"{source} is at epoch {state.epoch}{partial} of the {phase.name} "
                         f"phase; {EPOCH_FLAGS[phase.name]} {phase.epochs} asks for nothing more"
                         + (f" of it: going on with the {later} phase" if later
                            else ": nothing to do"))
        src, dest = Path(source).parent / phase.best_file, self.out_dir / phase.best_file
        problem = None
        if src.parent.resolve() != self.out_dir.resolve() and not dest.exists():
            if not src.is_file():
                problem = f"{src} is not there"
            elif (stored := load_checkpoint(src).get("best_psnr")) != state.best_psnr:
                problem = f"{src} holds the best of another point of the run (best_psnr {stored})"
            elif self.ctx.is_main:
                data = src.read_bytes()
                atomic_write(dest, lambda f: f.write(data))
        if problem and done:
            raise CheckpointError(f"cannot resume {source} into {self.out_dir}: the {phase.name} "
                                  f"phase has no epoch left to train and its best checkpoint "
                                  f"{problem}; resume into the checkpoint's own folder, or copy "
                                  f"that file into {self.out_dir}")
        if problem:
            state.best_psnr = -math.inf
            self.message(f"{problem}: the best {phase.name} epoch is picked again among the "
                         "epochs trained from now on")
        barrier(self.ctx)  # the best file is in place before any rank reads it

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


# ================================================================ the command

#: The validation values the summary shows, and how.
SUMMARY_VALUES = {"psnr": "student PSNR {:.2f} dB", "ssim": "SSIM {:.3f}",
                  "teacher_psnr": "teacher PSNR {:.2f} dB", "unseen_psnr": "unseen {:.2f} dB",
                  "bpp": "rate {:.3f} bits per pixel", "cka": "latent CKA {:.3f}",
                  "cross_psnr": "teacher decoder on the adapted student latent {:.2f} dB"}


def summary(files: dict[str, Path], history: list[dict[str, Any]]) -> str:
    """Where things are and the best student epoch's numbers."""
    out = files["best"].parent
    lines = [f"checkpoints: {out.resolve()}"]
    lines += [f"  {key:8s} {path}" for key, path in files.items() if path.exists()]
    grids = sorted(out.glob("*_epoch_*.png"), key=lambda p: p.stat().st_mtime)
    if grids:
        lines.append(f"  pictures {grids[-1]} (inputs / teacher / student), "
                     f"{out / 'loss_curves.png'}")
    student = [r for r in history if r["phase"] != "teacher"]
    if student:
        best = max(student, key=lambda r: r["val"]["psnr"])  # the epoch tinyvae_best.pth holds
        parts = [text.format(best["val"][k]) for k, text in SUMMARY_VALUES.items()
                 if k in best["val"]]
        lines.append(f"best validation ({best['phase']} epoch {best['epoch']}): "
                     + ", ".join(parts))
    return "\n".join(lines)


def command(argv: list[str] | None = None, prog: str = "hrm-vision distill") -> int:
    """Run the distiller of ``argv`` (flags over ``--config FILE`` over the defaults) and print
    where the results are. Returns 0 done, 1 diverged, 130/143 stopped by SIGINT/SIGTERM after
    saving; an expected failure raises (``hrm_vision.cli.run_main`` makes it status 2)."""
    args = build_parser(prog).parse_args(argv)
    distiller = None
    try:
        distiller = Distiller(config_from_args(args))
        files = distiller.run(resume=args.resume, force_resume=args.force_resume)
        if distiller.ctx.is_main:
            print(summary(files, distiller.history))
        return 0
    except TrainingInterrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 130 if exc.signame == "SIGINT" else 143
    except TrainingDiverged as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if distiller is not None:
            cleanup(distiller.ctx)
