"""One distillation training step at batch 64, with and without the teacher cache.

Built from the distiller's own pieces (:mod:`hrm_vision.train`): ``Trainable`` (student
forward sampling z, likelihood scale, adapter), the five-term ``DistillLoss`` with the default
``DistillConfig`` weights and the offline perceptual backbone (the teacher's first stage), a
backward pass and an AdamW step. "With cache" reads the teacher's targets from a
``TeacherCache`` (fp16, built once, what ``teacher_cache=True`` does); "without" runs the frozen
teacher on the batch inside every step, as the distiller does with ``teacher_cache=False``.
"""

from __future__ import annotations

import pytest
import torch

from hrm_vision.train.config import DistillConfig
from hrm_vision.train.loss import DistillLoss, Trainable, build_perceptual, teacher_targets
from hrm_vision.train.trainer import IndexedDataset, TeacherCache
from hrm_vision.vae import LatentAdapter, MinimalVAE


@pytest.mark.parametrize("cache", ["with-teacher-cache", "without-teacher-cache"])
def test_distill_step(benchmark, models, images, cache: str) -> None:
    benchmark.group = "distill step b64"
    teacher = models["teacher"].eval()
    c = DistillConfig()
    backbone, _ = build_perceptual("teacher", teacher)
    loss_fn = DistillLoss.from_config(c, backbone)
    module = Trainable(MinimalVAE(), loss_fn.scale,
                       LatentAdapter(128, teacher.latent_dim)).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    index = torch.arange(images.shape[0])
    teacher_cache = TeacherCache.build(teacher, IndexedDataset(list(images)), images.shape[0],
                                       torch.device("cpu"), show=False)

    def step() -> float:
        targets = (teacher_cache.lookup(index, torch.device("cpu"))
                   if cache == "with-teacher-cache" else teacher_targets(teacher, images))
        out, adapted = module(images)
        terms = loss_fn(images, out, adapted, targets)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        return float(terms["total"].detach())

    loss = benchmark.pedantic(step, rounds=6, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(loss))
