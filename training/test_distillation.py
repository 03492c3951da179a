#!/usr/bin/env python
"""Quick self-check of the distillation stack (< 1 minute on CPU, no download): the models
instantiate at their default sizes, each loss term computes and is finite on real photographs,
and one full training step (teacher frozen) changes both the student and the adapter. One line
per check and a pass/fail summary; exit status 0 when all pass.

    python training/test_distillation.py
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import torch

from hrm_vision.data import PhotoCrops
from hrm_vision.train.loss import TERMS, DistillLoss, TeacherFeatures, adapt, teacher_targets
from hrm_vision.vae import LatentAdapter, MinimalVAE, TeacherVAE


def _models() -> str:
    student, teacher = MinimalVAE(), TeacherVAE()
    adapter = LatentAdapter(student.latent_dim, teacher.latent_dim)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert student.eval()(x).mu.shape == (2, 128, 4, 4)
        assert teacher.eval()(x).mu.shape == (2, 512, 4, 4)
    n_adapter = sum(p.numel() for p in adapter.parameters())
    return (f"student {student.num_parameters():,} params, teacher "
            f"{teacher.num_parameters():,}, adapter {n_adapter:,}")


def _setup() -> tuple[MinimalVAE, LatentAdapter, TeacherVAE, DistillLoss, torch.Tensor]:
    torch.manual_seed(0)
    student = MinimalVAE(latent_dim=32, base_channels=16)
    teacher = TeacherVAE(latent_dim=64, base_channels=16, blocks_per_stage=1).eval()
    adapter = LatentAdapter(32, 64)
    loss = DistillLoss(perceptual=TeacherFeatures(teacher))
    ds = PhotoCrops("val", num_crops=8, seed=0)
    x = torch.stack([ds[i] for i in range(len(ds))])
    return student, adapter, teacher, loss, x


def _terms() -> str:
    student, adapter, teacher, loss, x = _setup()
    out = student.train()(x)
    terms = loss(x, out, adapt(adapter, out.mu, out.logvar), teacher_targets(teacher, x))
    bad = [k for k, v in terms.items() if not torch.isfinite(v)]
    assert not bad, f"non-finite terms: {bad}"
    return " ".join(f"{k}={terms[k].item():.4g}" for k in (*TERMS, "total"))


def _step() -> str:
    student, adapter, teacher, loss, x = _setup()
    before_s = [p.detach().clone() for p in student.parameters()]
    before_a = [p.detach().clone() for p in adapter.parameters()]
    before_t = [p.detach().clone() for p in teacher.parameters()]
    opt = torch.optim.AdamW([*student.parameters(), *adapter.parameters()], lr=1e-3)
    out = student.train()(x)
    total = loss(x, out, adapt(adapter, out.mu, out.logvar), teacher_targets(teacher, x))["total"]
    opt.zero_grad()
    total.backward()
    opt.step()

    def changed(before: list[torch.Tensor], module: torch.nn.Module) -> int:
        return sum(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))

    n_s, n_a, n_t = changed(before_s, student), changed(before_a, adapter), changed(before_t,
                                                                                     teacher)
    assert n_s > 0, "the student did not change"
    assert n_a == len(before_a), "the adapter did not change"
    assert n_t == 0, "the frozen teacher changed"
    return f"{n_s}/{len(before_s)} student and {n_a}/{len(before_a)} adapter tensors changed, " \
           "teacher unchanged"


CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("models instantiate", _models),
    ("each loss term computes and is finite", _terms),
    ("one training step changes student and adapter", _step),
]


def run_checks() -> bool:
    """Run every check, print one line each and a summary; True when all pass."""
    start = time.perf_counter()
    failures = 0
    for name, check in CHECKS:
        try:
            detail = check()
            print(f"PASS  {name}: {detail}")
        except Exception as exc:  # a self-check reports every failure instead of stopping
            failures += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    verdict = "all checks passed" if not failures else f"{failures} check(s) FAILED"
    print(f"{len(CHECKS) - failures}/{len(CHECKS)} passed in "
          f"{time.perf_counter() - start:.1f}s: {verdict}")
    return failures == 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks; exit status 0 when all pass, 1 otherwise."""
    argparse.ArgumentParser(prog="training/test_distillation.py",
                            description=__doc__).parse_args(argv)
    return 0 if run_checks() else 1


if __name__ == "__main__":
    sys.exit(main())
