"""One distillation training step at batch 64, with and without the teacher cache.

The step is written from the library's losses (:mod:`hrm_vision.distill.losses`): student
forward (sampling z), adapter, the five-term ``DistillLoss`` with the offline perceptual
backbone (the teacher's first stage), backward, AdamW step. "With cache" takes the teacher's
targets precomputed once (what ``teacher_cache=True`` does in the distiller); "without" runs the
frozen teacher on the batch inside every step.
"""

from __future__ import annotations

import pytest
import torch

from hrm_vision.distill.adapter import LatentAdapter
from hrm_vision.distill.losses import DistillLoss, TeacherTargets, adapt
from hrm_vision.distill.perceptual import build_perceptual
from hrm_vision.vae import MinimalVAE, TeacherVAE


@torch.no_grad()
def teacher_targets(teacher: TeacherVAE, x: torch.Tensor) -> TeacherTargets:
    """The frozen teacher's posterior and reconstruction of ``x`` (eval mode)."""
    mu, logvar = teacher.posterior(x)
    return TeacherTargets(mu, logvar, teacher.decode(mu))


@pytest.mark.parametrize("cache", ["with-teacher-cache", "without-teacher-cache"])
def test_distill_step(benchmark, models, images, cache: str) -> None:
    benchmark.group = "distill step b64"
    teacher = models["teacher"]
    student = MinimalVAE().train()
    adapter = LatentAdapter(student.latent_dim, teacher.latent_dim)
    backbone, _ = build_perceptual("teacher", teacher)
    loss_fn = DistillLoss(perceptual=backbone)
    optimizer = torch.optim.AdamW([*student.parameters(), *adapter.parameters()], lr=1e-3)
    cached = teacher_targets(teacher, images)

    def step() -> float:
        targets = cached if cache == "with-teacher-cache" else teacher_targets(teacher, images)
        out = student(images)
        terms = loss_fn(images, out, adapt(adapter, out.mu, out.logvar), targets)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        return float(terms["total"].detach())

    loss = benchmark.pedantic(step, rounds=6, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(loss))
