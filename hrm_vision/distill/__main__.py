"""``python -m hrm_vision.distill``: the command line of the distiller (``hrm-vision distill`` and
``training/distill_tinyvae.py`` call the same :func:`main`).

Every :class:`~hrm_vision.distill.config.DistillConfig` field is a flag (``--field-name``; the
original short names ``--lr`` and ``--batch-size`` too). Flags default to "not given", so only the
flags on the command line override ``--config FILE``, which overrides the defaults. The effective
config is written to ``checkpoint_dir/config.json``.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from .config import DistillConfig, load_config

#: The name the command's messages start with.
PROG = "distill_tinyvae"
#: Short flag names that differ from the config field names.
ALIASES = {"learning_rate": ["--lr"]}


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _add_field(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    flags = [f"--{name.replace('_', '-')}", *ALIASES.get(name, [])]
    ann = field.annotation
    help_text = (field.description or name.replace("_", " ")) + f" (default: {field.default})"
    args = typing.get_args(ann)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), ann) if optional else ann
    if base is bool:
        parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=help_text)
    elif typing.get_origin(base) is typing.Literal:
        parser.add_argument(*flags, dest=name, choices=list(typing.get_args(base)),
                            default=argparse.SUPPRESS, help=help_text)
    else:
        kind = base if base in (int, float, str) else str
        parser.add_argument(*flags, dest=name, type=_optional(kind) if optional else kind,
                            default=argparse.SUPPRESS, metavar=name.upper(),
                            help=help_text + (" ('none' for None)" if optional else ""))


def setup_args() -> argparse.ArgumentParser:
    """The argument parser: ``--config``, ``--resume``, ``--force-resume`` and one flag per
    config field."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Distil the TinyVAE (MinimalVAE) from a teacher VAE: pre-train the teacher if "
                    "none is given or found, distil, write checkpoints, history and pictures.")
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON file of config keys; flags given here override it")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a checkpoint, or 'auto' for the latest *_last.pth "
                             "in checkpoint_dir; the checkpoint's phase and models continue, "
                             "into checkpoint_dir (its own folder or a new one)")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even when config fields that shape the run (models, data, "
                             "batches, optimisation, loss) differ from the checkpoint's")
    group = parser.add_argument_group("config keys (every key is described in docs/training.md)")
    for name, field in DistillConfig.model_fields.items():
        _add_field(group, name, field)  # type: ignore[arg-type]
    return parser


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """Defaults < ``--config`` file < flags given on the command line."""
    given = {k: v for k, v in vars(args).items() if k in DistillConfig.model_fields}
    return load_config(args.config, given)


def summary(files: dict[str, Path], history: list[dict[str, Any]]) -> str:
    """What the user reads at the end: where things are and the last epoch's numbers."""
    out = files["best"].parent
    lines = [f"checkpoints: {out.resolve()}"]
    for key in ("best", "last", "teacher", "config", "history"):
        if key in files and files[key].exists():
            lines.append(f"  {key:8s} {files[key]}")
    grids = sorted(out.glob("*_epoch_*.png"), key=lambda p: p.stat().st_mtime)
    if grids:
        lines.append(f"  pictures {grids[-1]} (inputs / teacher / student), "
                     f"{out / 'loss_curves.png'}")
    student = [r for r in history if r["phase"] != "teacher"]
    if student:
        best = max(student, key=lambda r: r["val"]["psnr"])  # the epoch tinyvae_best.pth holds
        v = best["val"]
        parts = [f"student PSNR {v['psnr']:.2f} dB", f"SSIM {v['ssim']:.3f}"]
        if "teacher_psnr" in v:
            parts += [f"teacher PSNR {v['teacher_psnr']:.2f} dB",
                      f"quality ratio {v['quality_ratio']:.3f}", f"latent CKA {v['cka']:.3f}"]
        if "cross_psnr" in v:
            parts.append(f"teacher decoder on the adapted student latent {v['cross_psnr']:.2f} dB")
        lines.append(f"best validation ({best['phase']} epoch {best['epoch']}): "
                     + ", ".join(parts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the distiller, print where the results are. Returns the exit status:
    0 done, 1 the run diverged (:class:`~hrm_vision.distill.loop.TrainingDiverged`), 2 an
    expected failure (bad config, checkpoint, dataset, a file that cannot be written, a missing
    extra: one line on standard error, :func:`hrm_vision.cli.run_main`), 130/143 stopped by
    SIGINT/SIGTERM after saving. A resume with no epoch left to train says so ("... asks for
    nothing more: nothing to do") and exits with 0."""
    from ..cli import run_main

    return run_main(PROG, _run, argv)


def _run(argv: list[str] | None) -> int:
    from .data import cleanup
    from .trainer import Distiller, TrainingDiverged, TrainingInterrupted

    args = setup_args().parse_args(argv)
    distiller = None
    try:
        config = config_from_args(args)
        distiller = Distiller(config)
        files = distiller.run(resume=args.resume, force_resume=args.force_resume)
        if distiller.ctx.is_main:
            print(summary(files, distiller.history))
        return 0
    except TrainingInterrupted as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 130 if exc.signame == "SIGINT" else 143
    except TrainingDiverged as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if distiller is not None:
            cleanup(distiller.ctx)


if __name__ == "__main__":
    sys.exit(main())
