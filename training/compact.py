#!/usr/bin/env python
"""Train the compact pair and print what 64 numbers per 64x64 crop buy (``make compact``).

    python training/compact.py --config training/compact.json
    python training/compact.py --config training/compact.json --budget 3 --out-dir checkpoints/c3

Two runs of the package's trainer with one config: *distilled* (the compact teacher pre-trained,
then the student distilled from it) in ``<out-dir>/distilled`` and *alone* (the same student
without the distillation terms) in ``<out-dir>/alone``. The alone run gets the distilled run's
image-matching weight whole: ``recon_weight`` is the config's ``recon_weight +
distill_recon_weight`` (the weight of matching the teacher's reconstruction goes to matching the
image), ``distill_latent_weight`` and ``distill_recon_weight`` are 0.

Then :func:`hrm_vision.evaluation.compact.compact_table` on the held-out validation crops of the
config and on as many crops of an unseen source: the pooled PSNR of ``decode(encode(x))`` (eval
mode, posterior mean) and the rate (KL nats per number, bits per pixel) of the teacher, both
students (their best epochs, read from each run's ``history.json``) and the cross-decoding
``teacher.decode(adapter(student.encode(x)))``, beside the whole-crop baselines (PCA fitted on
the training crops). The table is printed as markdown and written to ``<out-dir>/compact.json``.
``--budget`` multiplies every phase's epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hrm_vision.checkpoints import load_model
from hrm_vision.evaluation.compact import (
    best_epoch,
    compact_table,
    cross_coder,
    evaluation_sets,
    markdown_table,
    vae_coder,
)
from hrm_vision.train import Distiller, load_config
from hrm_vision.train.config import DistillConfig
from hrm_vision.train.trainer import build_split, first_images

PROG = "training/compact.py"
#: The phases whose epochs hold each model's best.
STUDENT_PHASES = ("distill", "finetune")


def run_configs(config: str, budget: int, out: Path, seed: int | None = None
                ) -> tuple[DistillConfig, DistillConfig]:
    """The *distilled* and *alone* configs of ``config`` (see the module docstring);
    ``seed`` (crops, initialisation, order) replaces the config's."""
    base = load_config(config)
    epochs = {k: getattr(base, k) * budget for k in ("teacher_epochs", "epochs", "finetune_epochs")}
    if seed is not None:
        epochs["seed"] = seed
    distilled = load_config(config, {**epochs, "checkpoint_dir": str(out / "distilled")})
    alone = load_config(config, {**epochs, "checkpoint_dir": str(out / "alone"),
                                 "recon_weight": base.recon_weight + base.distill_recon_weight,
                                 "distill_latent_weight": 0.0, "distill_recon_weight": 0.0})
    return distilled, alone


def report(distilled: DistillConfig, alone: DistillConfig, files: dict[str, Path],
           alone_files: dict[str, Path]) -> list[dict[str, Any]]:
    """The rows of :func:`compact_table` for the two finished runs."""
    val = build_split(distilled, "val")
    sets = evaluation_sets(first_images(val, len(val)))
    train = first_images(build_split(distilled, "train"))
    teacher = load_model(files["teacher"], role="teacher")
    student = load_model(files["best"], role="student")
    adapter = load_model(files["best"], role="adapter")
    student_alone = load_model(alone_files["best"], role="student")
    epoch, epoch_alone = (best_epoch(f["history"], STUDENT_PHASES) for f in (files, alone_files))
    a, d = distilled.recon_weight, distilled.distill_recon_weight
    coders = [vae_coder("compact teacher", teacher, best_epoch(files["history"], ("teacher",))),
              vae_coder("compact student, distilled", student, epoch),
              vae_coder(f"compact student, alone (recon weight {a:g} + {d:g} = "
                        f"{alone.recon_weight:g}, no distillation)", student_alone, epoch_alone),
              cross_coder("cross-decoding (teacher decodes adapter(student latent))", student,
                          adapter, teacher, epoch)]
    return compact_table(coders, sets, train)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, measure, print and write the table; bad input is one line on standard error and
    status 2 (:func:`hrm_vision.cli.run_main`)."""
    from hrm_vision.cli import run_main

    return run_main(PROG, _run, argv)


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--config", default="training/compact.json")
    p.add_argument("--budget", type=int, default=1, help="multiply every phase's epochs")
    p.add_argument("--out-dir", default=None, help="default: the config's checkpoint_dir")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=None, help="seed of crops, initialisation and "
                   "order (default: the config's)")
    args = p.parse_args(argv)
    if args.budget < 1 or (args.threads is not None and args.threads < 1):
        p.error("--budget and --threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir or load_config(args.config).checkpoint_dir)
    distilled, alone = run_configs(args.config, args.budget, out, args.seed)
    files = Distiller(distilled).run()
    alone_files = Distiller(alone).run()
    rows = report(distilled, alone, files, alone_files)
    n, side = len(build_split(distilled, "val")), distilled.image_size
    print(f"\n{n} held-out validation crops of {distilled.dataset} and as many unseen-source "
          f"crops, {side}x{side}, budget x{args.budget}; PSNR of decode(encode(x)) pooled over "
          "each set; rate = KL to N(0, I)")
    print(markdown_table(rows))
    result = {"config": args.config, "budget": args.budget, "rows": rows}
    (out / "compact.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"written {out / 'compact.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
