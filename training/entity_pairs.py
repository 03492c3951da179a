#!/usr/bin/env python
"""Train the pairs of the trust report's entity agreement (docs/irp.md, "The trust report").

    python training/entity_pairs.py --config training/compact.json --out-dir checkpoints/entities

1. One compact teacher pre-trained on every training photograph of ``photos`` (the config's
   ``teacher_epochs``), in ``<out-dir>/teacher`` (``--teacher FILE`` reuses one instead).
2. The training photographs split into two disjoint halves (alternately, in
   :data:`hrm_vision.data.PHOTOS` order, the held-out ones left out); ``--crops`` crops of each
   half written as 64x64 PNG files into ``<out-dir>/half_a`` and ``half_b`` (the ``imagefolder``
   dataset, which holds out a tenth of the files for validation). With ``--corpus DIR`` (a
   corpus of ``benchmarks/corpus.py``: ``DIR/train``, ``DIR/val``) the halves are its training
   pictures instead, alternately in name order with the variants of one picture (``-d``/``-l``,
   dark and light) kept in one half, as folders of links ``half_X/train`` beside ``half_X/val``
   (the corpus's held-out pictures, the same for both halves), for a config that streams crops
   (``training/entity_corpus.json``: the learning benchmark's compact settings).
3. On each half, with the package's trainer and the config: a student distilled from that one
   teacher (``distilled_a``, ``distilled_b``) and the same student trained alone
   (``alone_a``, ``alone_b``: the image-matching weight of the distilled run whole, no
   distillation terms, as ``training/compact.py``'s alone run).

Then it prints the ``hrm-vision trust`` command that reads the four students. ``--budget``
multiplies every phase's epochs.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hrm_vision._extras import require
from hrm_vision.data import PHOTOS, VAL_PHOTOS, crop_images, load_photo
from hrm_vision.train import Distiller, load_config

PROG = "training/entity_pairs.py"


def halves() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The training photographs of ``photos`` in two disjoint halves."""
    train = [p for p in PHOTOS if p not in VAL_PHOTOS]
    return tuple(train[0::2]), tuple(train[1::2])


def write_crops(photos: Sequence[str], folder: Path, count: int, size: int, seed: int) -> Path:
    """``count`` crops of ``photos`` as PNG files ``folder/NNNNN.png`` (an image folder)."""
    image = require("PIL.Image", extra="photos", purpose="the image folders of the halves")
    folder.mkdir(parents=True, exist_ok=True)
    crops = crop_images([load_photo(p) for p in photos], count, size, seed, label=str(photos))
    for i, crop in enumerate(crops.permute(0, 2, 3, 1).numpy()):
        image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:05d}.png")
    return folder


def corpus_halves(corpus: Path, out: Path) -> list[Path]:
    """``[out/half_a, out/half_b]``: image folders of links, ``train/`` the corpus's training
    pictures alternately by name (a picture's ``-d``/``-l`` variants together), ``val/`` all of
    the corpus's held-out pictures."""
    pictures = sorted(p for p in (corpus / "train").iterdir() if p.is_file())
    held_out = sorted(p for p in (corpus / "val").iterdir() if p.is_file())
    kind = {p: re.sub(r"-[dl]$", "", p.stem) for p in pictures}  # variants: one kind
    groups = sorted(set(kind.values()))
    if len(groups) < 2 or not held_out:
        raise SystemExit(f"{PROG}: {corpus} needs pictures of two kinds in train/ and one in val/")
    folders = []
    for i, name in enumerate("ab"):
        part = [p for p in pictures if groups.index(kind[p]) % 2 == i]
        for split, files in (("train", part), ("val", held_out)):
            (out / f"half_{name}" / split).mkdir(parents=True, exist_ok=True)
            for f in files:
                link = out / f"half_{name}" / split / f.name
                if not link.is_symlink():
                    link.symlink_to(f.resolve())
        folders.append(out / f"half_{name}")
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    from hrm_vision.cli import run_main

    return run_main(PROG, _run, argv)


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--config", default="training/compact.json")
    p.add_argument("--out-dir", default="checkpoints/entities")
    p.add_argument("--budget", type=int, default=1, help="multiply every phase's epochs")
    p.add_argument("--crops", type=int, default=2304, help="crops per half (default 2304)")
    p.add_argument("--teacher", default=None, help="a trained compact teacher to reuse")
    p.add_argument("--corpus", default=None, help="halves of this corpus's training pictures "
                   "(benchmarks/corpus.py) instead of the photos")
    args = p.parse_args(argv)
    if args.budget < 1 or args.crops < 20:
        p.error("--budget must be >= 1 and --crops >= 20")
    out, base = Path(args.out_dir), load_config(args.config)
    epochs = {k: getattr(base, k) * args.budget for k in ("epochs", "finetune_epochs")}
    teacher = args.teacher
    if teacher is None:
        Distiller(load_config(args.config, {
            "epochs": 0, "finetune_epochs": 0, "teacher_epochs": base.teacher_epochs * args.budget,
            "checkpoint_dir": str(out / "teacher")})).run()
        teacher = str(out / "teacher" / "teacher.pth")
    best: dict[str, str] = {}
    folders = (corpus_halves(Path(args.corpus), out) if args.corpus else
               [write_crops(photos, out / f"half_{name}", args.crops, base.image_size,
                            base.seed + ord(name))
                for name, photos in zip("ab", halves(), strict=True)])
    for name, folder in zip("ab", folders, strict=True):
        data = {**epochs, "dataset": "imagefolder", "data_dir": str(folder), "teacher_epochs": 0,
                **({} if args.corpus else {"train_samples": None, "val_samples": None})}
        runs = {"distilled": {"teacher_checkpoint": teacher},
                "alone": {"recon_weight": base.recon_weight + base.distill_recon_weight,
                          "distill_latent_weight": 0.0, "distill_recon_weight": 0.0}}
        for kind, extra in runs.items():
            files = Distiller(load_config(args.config, {
                **data, **extra, "checkpoint_dir": str(out / f"{kind}_{name}")})).run()
            best[f"{kind}_{name}"] = str(files["best"])
    command = ["hrm-vision", "trust", "CHECKPOINT", "--out", str(out / "trust"),
               "--distilled-pair", best["distilled_a"], best["distilled_b"],
               "--alone-pair", best["alone_a"], best["alone_b"]]
    if not args.corpus:
        print("halves:", *(", ".join(h) for h in halves()), sep="\n  ")
    print("the trust report of a compact student with these pairs:\n  " + shlex.join(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
