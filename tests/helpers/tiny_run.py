"""A tiny, fast distillation setup for robustness checks (kill/resume, torchrun, bad input).

``prepare(workdir, epochs)`` writes, under ``workdir``:

- ``images/``: real photo crops (scikit-image's bundled photographs) as PNG files, read back
  through the ``imagefolder`` dataset;
- ``teacher.pth``: a small untrained ``TeacherVAE`` checkpoint (so no teacher pre-training runs);

and returns the ``training/distill_tinyvae.py`` arguments of a run on them with tiny models
(checkpoints in ``workdir/ckpt``). Nothing is downloaded.

    python -m tests.helpers.tiny_run WORKDIR --epochs 3     # prints the command line
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from PIL import Image

from hrm_vision.train.config import DistillConfig

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "training" / "distill_tinyvae.py"

TEACHER = {"latent_dim": 16, "base_channels": 8, "blocks_per_stage": 1}
STUDENT = {"latent_dim": 8, "base_channels": 8}


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` 32x32 RGB PNG crops of real photographs in ``folder``."""
    from hrm_vision.data import PhotoCrops

    folder.mkdir(parents=True, exist_ok=True)
    crops = PhotoCrops("val", num_crops=count, seed=seed).images_uint8
    for i, crop in enumerate(crops):
        Image.fromarray(crop.permute(1, 2, 0).numpy()).save(folder / f"crop_{i:04d}.png")


def write_teacher(path: Path, seed: int = 0) -> None:
    """An untrained tiny ``TeacherVAE`` checkpoint (role ``teacher``) at ``path``."""
    import torch

    from hrm_vision.io import model_entry, save_checkpoint
    from hrm_vision.vae import TeacherVAE

    torch.manual_seed(seed)
    save_checkpoint(model_entry(TeacherVAE(**TEACHER), "teacher"), path)


def prepare(workdir: str | Path, epochs: int, images: int = 48, batch_size: int = 8,
            **flags: object) -> list[str]:
    """Write the images and teacher under ``workdir``; the distiller's argv (without the
    interpreter and script). ``flags`` add or override ``--flag value`` pairs
    (``save_interval=2`` becomes ``--save-interval 2``)."""
    workdir = Path(workdir)
    if not (workdir / "images").is_dir():
        write_images(workdir / "images", images)
    if not (workdir / "teacher.pth").is_file():
        write_teacher(workdir / "teacher.pth")
    options: dict[str, object] = {
        "dataset": "imagefolder", "data_dir": workdir / "images", "image_size": 32,
        "teacher_checkpoint": workdir / "teacher.pth",
        "teacher_latent_dim": TEACHER["latent_dim"],
        "teacher_base_channels": TEACHER["base_channels"],
        "teacher_blocks_per_stage": TEACHER["blocks_per_stage"],
        "student_latent_dim": STUDENT["latent_dim"],
        "student_base_channels": STUDENT["base_channels"],
        "perceptual_backbone": "teacher", "batch_size": batch_size, "epochs": epochs,
        "warmup_steps": 2, "log_interval": 1000, "save_interval": 2, "device": "cpu",
        "checkpoint_dir": workdir / "ckpt",
    }
    options.update(flags)
    argv: list[str] = []
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def distill(argv: list[str]) -> int:
    """``hrm-vision distill ARGV`` in this process: the command with the package's error path
    (an expected failure is one line ``hrm-vision distill: error: ...`` and status 2)."""
    from hrm_vision.cli import run_main
    from hrm_vision.train import command

    return run_main(PROG, command, argv)


#: The name the command's messages start with.
PROG = "hrm-vision distill"


def config(argv: list[str]) -> DistillConfig:
    """The config ``hrm-vision distill ARGV`` runs with."""
    from hrm_vision.train.config import build_parser, config_from_args

    return config_from_args(build_parser(PROG).parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Prepare ``WORKDIR`` and print the command line of the tiny run."""
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.tiny_run",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    print(shlex.join([sys.executable, str(SCRIPT), *prepare(args.workdir, args.epochs)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
