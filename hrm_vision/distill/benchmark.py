"""What the teacher cache saves: training-step throughput, measured interleaved in one process.

``python -m hrm_vision.distill.benchmark [--batch-size 64] [--rounds 3] [--steps 5]``

Times ``steps`` optimizer steps (forward, five-term loss, backward, AdamW) of the default-size
student and adapter on real photographs in three settings, in turns (one warm-up round, then
``rounds`` timed rounds, :func:`hrm_vision.evaluation.timing.interleaved_timings`) so that load
from other processes affects all alike:

- ``student alone``: recon + KL only (no teacher);
- ``distill, cached teacher``: the five terms with the teacher's outputs read from a
  :class:`~hrm_vision.distill.teacher_cache.TeacherCache`;
- ``distill, live teacher``: the same with the frozen teacher run on every batch.

``--perceptual`` adds the perceptual term with the ``teacher`` backbone to the distill settings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from ..data.photos import PhotoCrops
from ..evaluation.timing import interleaved_timings
from ..vae import MinimalVAE, TeacherVAE
from .adapter import LatentAdapter
from .losses import DistillLoss, TeacherTargets, adapt, teacher_targets
from .perceptual import TeacherFeatures
from .splits import IndexedDataset
from .teacher_cache import TeacherCache


def measure(batch_size: int = 64, rounds: int = 3, steps: int = 5,
            perceptual: bool = False) -> dict[str, float]:
    """Median images per second of each setting (see the module docstring)."""
    torch.manual_seed(0)
    data = PhotoCrops("val", num_crops=batch_size, seed=0)
    x = torch.stack([data[i] for i in range(len(data))])
    index = torch.arange(batch_size)
    student, adapter = MinimalVAE(), LatentAdapter()
    teacher = TeacherVAE().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cache = TeacherCache.build(teacher, IndexedDataset(data), batch_size, torch.device("cpu"),
                               show=False)
    opt = torch.optim.AdamW([*student.parameters(), *adapter.parameters()], lr=1e-4)
    backbone = TeacherFeatures(teacher) if perceptual else None
    alone = DistillLoss(distill_latent_weight=0, distill_recon_weight=0, perceptual_weight=0)
    full = DistillLoss(perceptual_weight=0.1 if perceptual else 0.0, perceptual=backbone)

    settings: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        "student alone": lambda: alone(x, student(x), None, None),
        "distill, cached teacher": lambda: _distill(full, student, adapter, x,
                                                    cache.lookup(index, torch.device("cpu"))),
        "distill, live teacher": lambda: _distill(full, student, adapter, x,
                                                  teacher_targets(teacher, x)),
    }

    def train(step: Callable[[], dict[str, torch.Tensor]]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                step()["total"].backward()
                opt.step()
                opt.zero_grad()
        return run

    times = interleaved_timings({k: train(v) for k, v in settings.items()}, rounds, warmup=1,
                                desc="distill steps")
    return {k: batch_size * steps / sorted(v)[len(v) // 2] for k, v in times.items()}


def _distill(loss: DistillLoss, student: MinimalVAE, adapter: LatentAdapter, x: torch.Tensor,
             teacher: TeacherTargets) -> dict[str, torch.Tensor]:
    out = student(x)
    return loss(x, out, adapt(adapter, out.mu, out.logvar), teacher)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(prog="python -m hrm_vision.distill.benchmark",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--perceptual", action="store_true",
                        help="add the perceptual term (teacher backbone) to the distill settings")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rates = measure(args.batch_size, args.rounds, args.steps, args.perceptual)
    print(f"| setting (batch {args.batch_size}, perceptual {'on' if args.perceptual else 'off'})"
          " | train img/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} |")
    speedup = rates["distill, cached teacher"] / rates["distill, live teacher"]
    print(f"cached/live speed-up: {speedup:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
