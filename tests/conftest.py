"""Shared fixtures: tiny models and real images, all made locally (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from hrm_vision.data import PhotoCrops


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    """Seed 0 and one torch thread per test: the tiny models gain nothing from a second thread
    (fast suite 2 min 46 s with one, 2 min 56 s with two, idle 2-core VM) and one thread does not
    collapse when other jobs share the cores."""
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def photo_batch() -> torch.Tensor:
    """16 real validation crops, (16, 3, 32, 32) float in [0, 1]."""
    ds = PhotoCrops("val", num_crops=16, seed=0)
    return torch.stack([ds[i] for i in range(len(ds))])
