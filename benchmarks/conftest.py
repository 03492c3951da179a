"""Shared fixtures of the benchmarks: both VAEs at their default sizes and real images.

Run them with ``make bench`` (pytest-benchmark, then ``benchmarks/ratios.py``). Speed does not
depend on the weights, so the models are freshly initialised (seeded): no checkpoint needed.
"""

from __future__ import annotations

import os

import pytest
import torch

from hrm_vision.data import PhotoCrops
from hrm_vision.vae import MinimalVAE, TeacherVAE

#: Batch size of every benchmark (the batch the throughput ratios are reported at).
BATCH = 64
#: Torch (and ONNX Runtime) CPU threads: ``HRM_BENCH_THREADS``, default 1 (on a shared machine,
#: multi-threaded timings of small convolutions mostly measure threads waiting for each other).
THREADS = int(os.environ.get("HRM_BENCH_THREADS", "1"))


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """``BATCH`` real validation crops, (64, 3, 32, 32) float in [0, 1]."""
    ds = PhotoCrops("val", num_crops=BATCH, seed=0)
    return torch.stack([ds[i] for i in range(len(ds))])


@pytest.fixture(scope="session")
def models() -> dict[str, torch.nn.Module]:
    """``{"teacher": TeacherVAE(), "student": MinimalVAE()}`` at default sizes, eval mode."""
    return {"teacher": TeacherVAE().eval(), "student": MinimalVAE().eval()}
