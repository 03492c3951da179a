"""Shared fixtures: tiny models and real images, all made locally (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from hrm_vision.data.photos import PhotoCrops


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def photo_batch() -> torch.Tensor:
    """16 real validation crops, (16, 3, 32, 32) float in [0, 1]."""
    ds = PhotoCrops("val", num_crops=16, seed=0)
    return torch.stack([ds[i] for i in range(len(ds))])
