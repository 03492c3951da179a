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

Then :func:`compact_table` on the held-out validation crops of the config and on as many crops
of an unseen source: the pooled PSNR of ``decode(encode(x))`` (eval mode, posterior mean) and
the rate (KL nats per number, bits per pixel) of the teacher, both students (their best epochs,
read from each run's ``history.json``) and the cross-decoding
``teacher.decode(adapter(student.encode(x)))``, beside the whole-crop baselines (PCA fitted on
the training crops). The table is printed as markdown and written to ``<out-dir>/compact.json``.
``--budget`` multiplies every phase's epochs.

:func:`compact_table` makes the rows this script and ``experiments/compact_train.py`` print
and write: for every *coder* (a model's ``decode(encode(x))``, or the cross-decoding
``teacher.decode(adapter(student.encode(x)))``) and every baseline of
:func:`hrm_vision.evaluate.crop_baselines`, the pooled PSNR on each evaluation set; for the
models also the rate, the KL of the posterior to N(0, I):

* nats per number: the mean KL per latent number (:func:`hrm_vision.train.loss.gaussian_kl`);
* bits per pixel: ``nats_per_number * numbers / (H * W * ln 2)``, the rate of one crop spread
  over its ``H * W`` pixels (:func:`hrm_vision.patches.bits_per_pixel` counts 64 pixels per latent
  cell; a whole ``H x W`` crop is ``H * W / 64`` cells).

Evaluation sets (:func:`evaluation_sets`): *held-out* crops (the validation photographs of the
training dataset) and *unseen sources* crops (:func:`hrm_vision.trust.unseen_crops`: a
photograph of another collection, matplotlib's bundled ``grace_hopper.jpg``, none of whose
pixels the ``photos`` dataset holds). Images are float ``(N, C, S, S)`` in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hrm_vision.evaluate import CROP_PCA_COEFFICIENTS, CROP_PCA_FIT, crop_baselines
from hrm_vision.io import load
from hrm_vision.metrics import psnr
from hrm_vision.patches import PIXELS_PER_CELL, bits_per_pixel
from hrm_vision.train import Distiller, load_config
from hrm_vision.train.config import DistillConfig
from hrm_vision.train.loss import gaussian_kl
from hrm_vision.train.trainer import build_split, first_images
from hrm_vision.trust import unseen_crops
from hrm_vision.vae import VAEBase

#: Names of the two evaluation sets, as the table's columns call them.
SET_LABELS = {"held_out": "held-out", "unseen": "unseen sources"}


def evaluation_sets(held_out: Tensor, num_unseen: int | None = None) -> dict[str, Tensor]:
    """``{"held_out": held_out, "unseen": unseen_crops(...)}``, the unseen set as large as the
    held-out one unless ``num_unseen`` says otherwise, at the held-out crops' side."""
    n = len(held_out) if num_unseen is None else num_unseen
    return {"held_out": held_out, "unseen": unseen_crops(n, held_out.shape[-1])}


@dataclass(frozen=True)
class Coder:
    """A code of ``numbers`` numbers per crop: ``decode(encode(x))`` reconstructs ``x``.

    ``posterior`` (images -> ``(mu, logvar)``, each ``(N, numbers)``) gives the rate; None for
    a code without one. ``best_epoch`` says which epoch of its run the model is (or None).
    """

    name: str
    numbers: int
    encode: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor]
    posterior: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    best_epoch: str | None = None


def vae_coder(name: str, model: VAEBase, best_epoch: str | None = None) -> Coder:
    """``model``'s own ``decode(encode(x))`` (eval mode, the posterior mean)."""
    model.eval()
    return Coder(name, model.latent_dim, model.encode, model.decode, model.posterior, best_epoch)


def cross_coder(name: str, student: VAEBase, adapter: nn.Module, teacher: VAEBase,
                best_epoch: str | None = None) -> Coder:
    """``teacher.decode(adapter(student.encode(x)))``: the student's code (and rate) read by the
    teacher's decoder."""
    student.eval(), adapter.eval(), teacher.eval()
    return Coder(name, student.latent_dim, lambda x: adapter(student.encode(x)), teacher.decode,
                 student.posterior, best_epoch)


@torch.no_grad()
def decoded_psnr(encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor],
                 images: Tensor, batch: int = 128) -> float:
    """Pooled PSNR (dB) of ``decode(encode(x))``, clamped to [0, 1], over ``images``."""
    rec = torch.cat([decode(encode(images[i:i + batch])) for i in range(0, len(images), batch)])
    return psnr(rec.clamp(0, 1), images)


@torch.no_grad()
def rate(posterior: Callable[[Tensor], tuple[Tensor, Tensor]], images: Tensor,
         batch: int = 128) -> tuple[float, float]:
    """``(nats per number, bits per pixel)`` of the posterior's KL to N(0, I) over ``images``
    (see the module docstring)."""
    kl = torch.cat([gaussian_kl(*posterior(images[i:i + batch]))
                    for i in range(0, len(images), batch)])
    nats = float(kl.mean())
    pixels = images.shape[-2] * images.shape[-1]
    return nats, bits_per_pixel(nats, kl.shape[1]) * PIXELS_PER_CELL / pixels


def compact_table(coders: Sequence[Coder], sets: Mapping[str, Tensor], train: Tensor,
                  coefficients: Sequence[int] = CROP_PCA_COEFFICIENTS) -> list[dict[str, Any]]:
    """One row per coder, then one per baseline by increasing numbers (PCA fitted on ``train``;
    the PCA sizes of ``coefficients`` that need more training crops than ``train`` holds are
    left out): ``{"name", "numbers", "psnr_db": {set: dB}, "kl_nats_per_number":
    {set: nats} or None, "bits_per_pixel": {set: bits} or None, "best_epoch": str or None}``."""
    rows: list[dict[str, Any]] = []
    for c in coders:
        rates = {k: rate(c.posterior, x) for k, x in sets.items()} if c.posterior else None
        rows.append({"name": c.name, "numbers": c.numbers,
                     "psnr_db": {k: decoded_psnr(c.encode, c.decode, x) for k, x in sets.items()},
                     "kl_nats_per_number": rates and {k: r[0] for k, r in rates.items()},
                     "bits_per_pixel": rates and {k: r[1] for k, r in rates.items()},
                     "best_epoch": c.best_epoch})
    baselines: dict[str, dict[str, Any]] = {}
    fits = tuple(k for k in coefficients if k < min(len(train), CROP_PCA_FIT))
    for key, x in sets.items():
        for b in crop_baselines(x, train, coefficients=fits):
            row = baselines.setdefault(b.name, {"name": b.name, "numbers": b.numbers,
                                                "psnr_db": {}, "kl_nats_per_number": None,
                                                "bits_per_pixel": None, "best_epoch": None})
            row["psnr_db"][key] = b.psnr_db
    return rows + sorted(baselines.values(), key=lambda r: r["numbers"])


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`compact_table` as a markdown table: PSNR and rate on each set."""
    keys = list(rows[0]["psnr_db"]) if rows else []
    labels = [SET_LABELS.get(k, k) for k in keys]
    head = ["code", "numbers per crop", *(f"PSNR {lb} (dB)" for lb in labels),
            *(f"rate {lb} (nats/number, bits/pixel)" for lb in labels), "best epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rates = [f"{r['kl_nats_per_number'][k]:.2f}, {r['bits_per_pixel'][k]:.3f}"
                 if r["kl_nats_per_number"] else "-" for k in keys]
        cells = [r["name"], str(r["numbers"]), *(f"{r['psnr_db'][k]:.2f}" for k in keys),
                 *rates, r["best_epoch"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_epoch(history: str | Path, phases: Sequence[str]) -> str:
    """Which epoch of ``phases`` in a run's ``history.json`` holds its best model: the last
    record marked ``is_best`` among them, as ``"<phase> epoch <e> of <n>"``."""
    records = [r for r in json.loads(Path(history).read_text(encoding="utf-8"))
               if r["phase"] in phases]
    best = [r for r in records if r["is_best"]]
    if not best:
        raise ValueError(f"{history} marks no best epoch of the {'/'.join(phases)} phase(s)")
    last = best[-1]
    total = max(r["epoch"] for r in records if r["phase"] == last["phase"])
    return f"{last['phase']} epoch {last['epoch']} of {total}"


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
    teacher = load(files["teacher"], role="teacher")
    student = load(files["best"], role="student")
    adapter = load(files["best"], role="adapter")
    student_alone = load(alone_files["best"], role="student")
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
