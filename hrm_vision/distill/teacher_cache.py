"""The frozen teacher's outputs for a whole dataset, computed once per phase."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .losses import TeacherTargets, teacher_targets
from .splits import IndexedDataset


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
