#!/usr/bin/env python
"""Train the compact pair and print what 64 numbers per 64x64 crop buy (``make compact``).

    python training/compact.py --config training/compact.json
    python training/compact.py --config training/compact.json --budget 3 --out-dir checkpoints/c3

Two runs of the package's trainer with one config: *distilled* (the compact teacher pre-trained,
then the student distilled from it) in ``<checkpoint_dir>/distilled`` and *alone* (the student
with the same image-matching weights and no distillation terms) in ``<checkpoint_dir>/alone``.
Then, on the config's validation crops, the pooled PSNR of ``decode(encode(x))`` (eval mode,
posterior mean) for the teacher, both students (their best epochs) and the cross-decoding
``teacher.decode(adapter(student.encode(x)))``, beside the whole-crop baselines
(:func:`hrm_vision.evaluation.baselines.crop_baselines`, PCA fitted on the training crops).
The table is printed and written to ``<checkpoint_dir>/compact.json``. ``--budget`` multiplies
every phase's epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from hrm_vision.checkpoints import load_model
from hrm_vision.distill import Distiller, load_config
from hrm_vision.distill.data import build_split, first_images
from hrm_vision.evaluation.baselines import crop_baselines
from hrm_vision.metrics import psnr


@torch.no_grad()
def decoded_psnr(encode: nn.Module, decode: nn.Module, images: Tensor, batch: int = 128) -> float:
    """Pooled PSNR (dB) of ``decode(encode(x))`` over ``images`` (N, C, S, S) in [0, 1]."""
    rec = torch.cat([decode(encode(images[i:i + batch])) for i in range(0, len(images), batch)])
    return psnr(rec.clamp(0, 1), images)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="training/compact.json")
    p.add_argument("--budget", type=int, default=1, help="multiply every phase's epochs")
    p.add_argument("--out-dir", default=None, help="default: the config's checkpoint_dir")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.config)
    out = Path(args.out_dir or base.checkpoint_dir)
    budget = {k: getattr(base, k) * args.budget
              for k in ("teacher_epochs", "epochs", "finetune_epochs")}
    distilled = load_config(args.config, {**budget, "checkpoint_dir": str(out / "distilled")})
    alone = load_config(args.config, {**budget, "checkpoint_dir": str(out / "alone"),
                                      "distill_latent_weight": 0.0,
                                      "distill_recon_weight": 0.0})
    files = Distiller(distilled).run()
    alone_files = Distiller(alone).run()

    val = first_images(build_split(base, "val"), len(build_split(base, "val")))
    train = first_images(build_split(base, "train"))
    teacher = load_model(files["teacher"], role="teacher")
    student = load_model(files["best"], role="student")
    adapter = load_model(files["best"], role="adapter")
    student_alone = load_model(alone_files["best"], role="student")
    rows = [{"name": f"compact teacher ({teacher.latent_dim} numbers)",
             "numbers": teacher.latent_dim,
             "psnr_db": decoded_psnr(teacher.encode, teacher.decode, val)},
            {"name": "compact student, distilled", "numbers": student.latent_dim,
             "psnr_db": decoded_psnr(student.encode, student.decode, val)},
            {"name": "compact student, alone", "numbers": student_alone.latent_dim,
             "psnr_db": decoded_psnr(student_alone.encode, student_alone.decode, val)},
            {"name": "cross-decoding (teacher decodes the adapted student)",
             "numbers": student.latent_dim,
             "psnr_db": decoded_psnr(lambda x: adapter(student.encode(x)), teacher.decode, val)},
            *(b.to_dict() for b in crop_baselines(val, train))]
    print(f"\n{len(val)} validation crops {val.shape[-1]}x{val.shape[-1]} of {base.dataset}, "
          f"budget x{args.budget}; PSNR of decode(encode(x)), pooled over the set")
    print("| code | numbers per crop | PSNR (dB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['numbers']} | {r['psnr_db']:.2f} |")
    report = {"config": args.config, "budget": args.budget, "rows": rows}
    (out / "compact.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"written {out / 'compact.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
