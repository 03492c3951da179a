"""The data of a run and the ranks that share it: splits, the teacher cache, per-rank loaders.

The training and validation splits are indexed for the teacher cache (the frozen teacher's
outputs for a whole split, computed once per phase). Datasets are deterministic per index (see
:mod:`hrm_vision.data`), so one instance per ``(name, split, size, seed, folder)`` serves every
run in a process, and the first N images of the train split are a deterministic sample (what
:meth:`VAEBase.init_from_data` receives).

Data-parallel helpers for ``torchrun`` are one small surface the trainer calls on every rank.
Run the same script under ``torchrun --nproc_per_node N ...``: ``init_distributed`` reads the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins a process group
(gloo on CPU, nccl on CUDA). Without torchrun (or with one process) every helper degrades to the
single-process behaviour, so the trainer never branches on "am I distributed?".

Resume safety: the order of the samples in epoch ``e`` depends only on ``(seed, e)`` in both
modes (``set_epoch`` must be called at the start of every epoch), and the loaders never draw from
the global RNG, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import functools
import os
import signal
import zlib
from collections.abc import Iterator, Sized
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm.auto import tqdm

from ..data import build_dataset
from .config import DistillConfig
from .losses import TeacherTargets, teacher_targets


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the run: its rank among ``world_size`` and its device."""

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
        """True when more than one process takes part (a process group exists)."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"invalid device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return resolved


def init_distributed(device: str | None = None) -> DistContext:
    """The context of this process, joining the torchrun process group when ``WORLD_SIZE > 1``.

    ``device`` None picks ``"cuda"`` when available, else ``"cpu"``. Under torchrun on CUDA each
    rank uses ``cuda:LOCAL_RANK`` (whatever index ``device`` names). Raises ``ValueError`` for an
    unknown or unavailable device.
    """
    resolved = _resolve_device(device)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistContext(device=resolved)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


class EpochSampler(Sampler[int]):
    """Single-process sampler whose order in epoch ``e`` depends only on ``(seed, e)``.

    A shuffled permutation drawn from its own ``torch.Generator`` seeded with ``seed + epoch``
    (the same rule as ``DistributedSampler``), or ``0..n-1`` when ``shuffle`` is False.
    """

    def __init__(self, data: Sized, *, shuffle: bool, seed: int) -> None:
        self.data, self.shuffle, self.seed, self.epoch = data, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        n = len(self.data)
        if not self.shuffle:
            return iter(range(n))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(n, generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.data)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGINT and SIGTERM.

    Ctrl-C in a terminal, Slurm and systemd signal the whole process group. Left to PyTorch's
    handlers, a worker dies of the SIGTERM (the main process then fails with "DataLoader worker
    ... killed by signal" instead of saving) or raises KeyboardInterrupt; ignoring both leaves
    the decision to the main process, whose handler finishes the step, saves and exits. The
    workers still end with the main process (PyTorch shuts them down through their queues).
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, ctx: DistContext, seed: int,
                drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A DataLoader over this rank's share of ``dataset``.

    Distributed: a ``DistributedSampler`` (each rank gets a disjoint ``1/world_size`` share,
    padded by repetition to equal length unless ``drop_last``). Single process: an
    ``EpochSampler``. Either way call ``set_epoch(loader, epoch)`` before each epoch. Worker
    processes ignore SIGINT and SIGTERM (:func:`ignore_stop_signals`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the dataset is empty")
    sampler: Sampler[int]
    if ctx.enabled:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                     shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = EpochSampler(dataset, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
    # An own generator: DataLoader then never draws worker seeds from the global RNG.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=ctx.device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_stop_signals if num_workers else None,
                      persistent_workers=False)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select epoch ``epoch``'s sample order; call at the start of every epoch."""
    sampler = loader.sampler
    if not hasattr(sampler, "set_epoch"):
        raise ValueError("set_epoch needs a loader made by make_loader")
    sampler.set_epoch(epoch)
    if loader.generator is not None and isinstance(sampler, (EpochSampler, DistributedSampler)):
        loader.generator.manual_seed(sampler.seed + epoch)


def wrap_ddp(module: nn.Module, ctx: DistContext, *,
             find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(module)`` when distributed, else ``module`` unchanged.

    ``module`` must already be on ``ctx.device``. Save with
    ``hrm_vision.io.model_entry`` / ``unwrap`` so keys carry no ``module.`` prefix.
    """
    if not ctx.enabled:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids,
                                   find_unused_parameters=find_unused_parameters)


def _check_same_keys(keys: list[str], ctx: DistContext) -> None:
    """Raise (instead of hanging or mixing up values) when ranks reduce different keys."""
    signature = torch.tensor([zlib.crc32("\0".join(keys).encode())], dtype=torch.int64,
                             device=ctx.device)
    gathered = [torch.empty_like(signature) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, signature)
    if any(int(g) != int(signature) for g in gathered):
        raise ValueError(f"reduce_mean: rank {ctx.rank} reduces keys {keys}, another rank "
                         "reduces different ones; every rank must pass the same keys")


def reduce_mean(values: dict[str, float], ctx: DistContext, count: int) -> dict[str, float]:
    """Mean of ``values`` over all ranks, each rank weighted by ``count``.

    ``values`` are this rank's means over ``count`` samples; the result is the mean over all
    samples of all ranks (the same dict on every rank). Every rank must pass the same keys
    (checked: a mismatch is a ``ValueError`` on every rank, not a hang).
    Identity on one process. Keys whose total count is 0 become NaN.
    """
    if not ctx.enabled:
        return dict(values)
    keys = sorted(values)
    _check_same_keys(keys, ctx)
    data = torch.tensor([float(values[k]) * count for k in keys] + [float(count)],
                        dtype=torch.float64, device=ctx.device)
    dist.all_reduce(data, op=dist.ReduceOp.SUM)
    total = data[-1].item()
    means = {k: (s / total if total > 0 else float("nan"))
             for k, s in zip(keys, data[:-1].tolist(), strict=True)}
    return {k: means[k] for k in values}


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op on one process)."""
    if ctx.enabled:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op on one process or when none exists)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistContext", "EpochSampler", "barrier", "cleanup", "init_distributed",
           "make_loader", "reduce_mean", "set_epoch", "wrap_ddp"]


#: Training images passed to ``init_from_data`` (fewer when the split is smaller).
INIT_IMAGES = 4096


class IndexedDataset(Dataset[tuple[int, Tensor]]):
    """Yields ``(index, image)`` so per-index teacher outputs can be looked up.

    ``image`` is ``(3, H, W)`` float in [0, 1]; a base dataset yielding ``(image, label)`` pairs
    is reduced to the image.
    """

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
    return build_dataset(name, split, image_size=image_size, seed=seed, data_dir=data_dir,
                         download=download)


def build_split(config: DistillConfig, split: str) -> IndexedDataset:
    """The ``split`` of ``config.dataset``, cut to ``train_samples``/``val_samples``."""
    ds = _dataset(config.dataset, split, config.image_size, config.seed, config.data_dir,
                  config.download)
    limit = config.train_samples if split == "train" else config.val_samples
    if limit is not None and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, range(limit))
    return IndexedDataset(ds)


def first_images(dataset: IndexedDataset, limit: int | None = None) -> Tensor:
    """The first ``min(limit, len(dataset))`` images (``limit`` None: ``INIT_IMAGES``),
    ``(N, 3, H, W)`` float in [0, 1]."""
    n = min(INIT_IMAGES if limit is None else limit, len(dataset))
    return torch.stack([dataset[i][1] for i in range(n)])


class TeacherCache:
    """The frozen teacher's outputs for every index of a dataset, kept in fp16 on the CPU.

    Built once per phase (the datasets are deterministic per index): a distillation step then
    reads ``(mu, logvar, reconstruction)`` instead of running the teacher. ``mu``/``logvar`` are
    ``(N, teacher_dim, H/8, W/8)``, ``reconstruction`` ``(N, 3, H, W)`` in [0, 1].
    """

    def __init__(self, mu: Tensor, logvar: Tensor, reconstruction: Tensor) -> None:
        self.mu, self.logvar, self.reconstruction = mu, logvar, reconstruction

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, dataset: IndexedDataset, batch_size: int,
              device: torch.device, desc: str = "teacher cache",
              show: bool = True) -> TeacherCache:
        """Run ``teacher`` (put in eval mode) over ``dataset`` in order."""
        teacher.eval()
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for _, x in tqdm(loader, desc=desc, leave=False, disable=None if show else True):
            t = teacher_targets(teacher, x.to(device))
            parts.append((t.mu.half().cpu(), t.logvar.half().cpu(),
                          t.reconstruction.half().cpu()))
        return cls(*(torch.cat(t) for t in zip(*parts, strict=True)))

    @property
    def nbytes(self) -> int:
        """Memory held by the three tensors, in bytes."""
        return sum(t.numel() * t.element_size() for t in (self.mu, self.logvar,
                                                           self.reconstruction))

    def lookup(self, index: Tensor, device: torch.device) -> TeacherTargets:
        """The cached targets of dataset indices ``index`` (B,), in float32 on ``device``."""
        return TeacherTargets(self.mu[index].to(device).float(),
                              self.logvar[index].to(device).float(),
                              self.reconstruction[index].to(device).float())
