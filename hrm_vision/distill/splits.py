"""The training and validation splits a run uses, indexed for the teacher cache.

Datasets are deterministic per index (see :mod:`hrm_vision.data`), so one instance per
``(name, split, size, seed, folder)`` serves every run in a process, and the first N images of
the train split are a deterministic sample (what :meth:`VAEBase.init_from_data` receives).

The frozen teacher's outputs for a whole dataset, computed once per phase.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..data import build_dataset
from .config import DistillConfig
from .losses import TeacherTargets, teacher_targets

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
