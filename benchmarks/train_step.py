"""The compact student's training step, today's way against the fast way, timed interleaved.

    python benchmarks/train_step.py                  # batch 64, 64x64 crops, 2 threads, 30 rounds
    python benchmarks/train_step.py --rounds 3       # a smoke run of the machinery

One process, one batch of streamed photo crops, two copies of ``CompactStudentVAE`` (the sizes
of ``training/compact.json``) trained with the student-alone objective and AdamW:

- ``today``: float32, contiguous tensors (``mixed_precision`` off, ``channels_last`` false),
  the unfused AdamW, and the Gaussian NLL and straight-through clamp as they were computed
  before they were reduced to fewer passes over the images (:func:`legacy`: one term per
  number, summed; ``x + (x.clamp(0, 1) - x).detach()``);
- ``fast``: bf16 autocast on the CPU and channels-last tensors (``mixed_precision: bf16``,
  ``channels_last: true``; the models' pixel rearrangements then copy whole pixels), through
  the trainer's own ``autocast``, and the trainer's optimizer (``make_optimizer``: the fused
  AdamW).

A second pair times distillation's other cost, the frozen compact teacher's forward pass on
the same batch (no gradient, bf16 autocast, channels-last input), its weights as loaded
(``contiguous``) or channels-last (``channels_last``, what the trainer does). A third pair
times the step's check that every weight and AdamW tensor is finite, on the compact teacher's:
``isfinite(t).all()`` per tensor as it was, and the trainer's sums.

Each round times one step of each, in a rotating order (``hrm_vision.timing``), so other jobs
on the machine hit both alike; the load average is printed before and after. A last figure
times the data preparation of one batch of streamed crops (what ``num_workers`` moves off the
training thread). Prints a JSON object; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from hrm_vision.data import build_dataset
from hrm_vision.io import write_json
from hrm_vision.timing import machine_info, timings
from hrm_vision.train import DistillLoss, load_config
from hrm_vision.train import loss as loss_module
from hrm_vision.train.loss import Trainable
from hrm_vision.train.trainer import LastGoodState, autocast, configured_model, make_optimizer
from hrm_vision.vae import VAEBase

COMPACT = Path(__file__).resolve().parents[1] / "training" / "compact.json"


def _per_number_nll(prediction: torch.Tensor, target: torch.Tensor, log_sigma: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Gaussian NLL as today's step computed it: every number's term, then the sums."""
    ls = log_sigma.float()
    ls = ls.view(1, -1, 1, 1) if ls.dim() == 1 else ls
    err = (prediction.float() - target.float()).pow(2)
    nll = 0.5 * err * torch.exp(-2 * ls) + ls + 0.5 * math.log(2 * math.pi)
    return (nll if mask is None else nll * mask).flatten(1).sum(1).mean()


def _three_op_decode(self: VAEBase, z: torch.Tensor) -> torch.Tensor:
    """``VAEBase.decode`` as today's step computed it (the clamp's identity gradient in three
    passes over the images)."""
    x = self.decoder(z)
    if self.training and torch.is_grad_enabled():
        return x + (x.clamp(0.0, 1.0) - x).detach()
    return x.clamp(0.0, 1.0)


@contextlib.contextmanager
def legacy() -> Iterator[None]:
    """Today's NLL and clamp in place of the package's while the block runs."""
    saved = loss_module.gaussian_nll, VAEBase.decode
    loss_module.gaussian_nll, VAEBase.decode = _per_number_nll, _three_op_decode
    try:
        yield
    finally:
        loss_module.gaussian_nll, VAEBase.decode = saved
INIT_CROPS = 1024  #: crops the PCA starts are fitted on (more than the teacher's 512 numbers)


def make_step(config, batch: torch.Tensor, init: torch.Tensor, fast: bool):
    """A function doing one training step on ``batch`` of a compact student started from
    ``init`` (its PCA start) under ``config``, with the trainer's optimizer if ``fast`` (else
    the unfused AdamW)."""
    torch.manual_seed(0)
    model = configured_model(config, "student")
    model.init_from_data(init)
    loss = DistillLoss.from_config(config, None, distill=False)
    module = Trainable(model, loss.scale)
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:
        module.to(memory_format=fmt)
    x = batch.contiguous(memory_format=fmt)
    device = torch.device("cpu")
    optimizer = (make_optimizer(module.parameters(), config, device) if fast else
                 torch.optim.AdamW(module.parameters(), lr=config.learning_rate,
                                   weight_decay=config.weight_decay))

    def step() -> None:
        with contextlib.nullcontext() if fast else legacy(), autocast(config, device):
            total = loss(x, module(x)[0], None, None)["total"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return step


def teacher_forward(config, batch: torch.Tensor, init: torch.Tensor, channels_last: bool):
    """A function running the frozen compact teacher of ``config`` (its PCA start on ``init``)
    on the channels-last ``batch`` as distillation does (no gradient, the config's autocast),
    with its weights channels-last (what the trainer does) or as loaded."""
    torch.manual_seed(0)
    teacher = configured_model(config, "teacher").eval()
    teacher.init_from_data(init)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    x, device = batch.contiguous(memory_format=torch.channels_last), torch.device("cpu")

    def forward() -> None:
        with torch.no_grad(), autocast(config, device):
            teacher(x)
    return forward


def finiteness_checks(config, init: torch.Tensor) -> dict:
    """The step's check that every weight and AdamW tensor of the compact teacher of ``config``
    is finite: ``isfinite`` (``isfinite(t).all()`` per tensor, as it was) and ``sums`` (the
    trainer's :meth:`LastGoodState.all_finite`)."""
    teacher = configured_model(config, "teacher")
    teacher.init_from_data(init)
    optimizer = make_optimizer(teacher.parameters(), config, torch.device("cpu"))
    for p in teacher.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the AdamW state exists
    state = LastGoodState(teacher, optimizer)
    tensors = [*teacher.parameters(), *(v for e in optimizer.state.values() for v in e.values()
                                        if v.is_floating_point())]
    return {"isfinite": lambda: bool(torch.stack([torch.isfinite(t).all() for t in tensors]
                                                 ).all()),
            "sums": state.all_finite}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = {**json.loads(COMPACT.read_text()), "perceptual_weight": 0.0,
            "distill_latent_weight": 0.0, "distill_recon_weight": 0.0}
    base.pop("checkpoint_dir")
    configs = {"today": load_config(None, {**base, "mixed_precision": "off"}),
               "fast": load_config(None, {**base, "mixed_precision": "bf16",
                                          "channels_last": True})}
    stream = build_dataset("photos", "train", image_size=configs["today"].image_size,
                           crops="stream", num_crops=max(INIT_CROPS, args.batch))
    init = torch.stack([stream[i] for i in range(len(stream))])
    batch = init[:args.batch]
    load_before = os.getloadavg()
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, "
          f"batch {args.batch} of {tuple(batch.shape[1:])}, load average before "
          f"{load_before[0]:.2f}", file=sys.stderr)
    steps = timings({name: make_step(c, batch, init, name == "fast")
                     for name, c in configs.items()},
                    repeats=args.rounds, warmup=2, batch_size=args.batch, desc="train step")

    teacher = {name: teacher_forward(configs["fast"], batch, init, name == "channels_last")
               for name in ("contiguous", "channels_last")}
    teachers = timings(teacher, repeats=args.rounds, warmup=2, batch_size=args.batch,
                       desc="teacher forward")

    checks = timings(finiteness_checks(configs["fast"], init), repeats=args.rounds, warmup=2,
                     batch_size=1, desc="finiteness check")

    def prepare() -> None:
        stream.set_epoch(stream.epoch + 1)
        torch.stack([stream[i] for i in range(args.batch)])  # one batch's crops

    start = time.perf_counter()
    prepare()
    data_ms = 1e3 * (time.perf_counter() - start)
    result = {
        "machine": machine_info(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "step": {name: {**t, "steps_per_s": 1e3 / t["median_ms"]} for name, t in steps.items()},
        "speedup": steps["today"]["median_ms"] / steps["fast"]["median_ms"],
        "teacher_forward_ms": {name: t["median_ms"] for name, t in teachers.items()},
        "teacher_speedup": (teachers["contiguous"]["median_ms"]
                            / teachers["channels_last"]["median_ms"]),
        "finiteness_check_ms": {name: t["median_ms"] for name, t in checks.items()},
        "streamed_batch_preparation_ms": data_ms,
    }
    for name, t in result["step"].items():
        print(f"{name:6s} {t['median_ms']:8.1f} ms per step (p90 {t['p90_ms']:.1f}), "
              f"{t['steps_per_s']:.2f} steps/s", file=sys.stderr)
    print(f"teacher forward: {result['teacher_speedup']:.2f}x with its weights channels-last; "
          f"finiteness check of the teacher's tensors {result['finiteness_check_ms']} ms",
          file=sys.stderr)
    print(f"speedup {result['speedup']:.2f}x; one streamed batch prepared in {data_ms:.0f} ms "
          f"on the training thread; load average after {result['load_average_after'][0]:.2f}",
          file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        write_json(result, args.out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
