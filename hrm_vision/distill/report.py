"""Compare finished runs: ``python -m hrm_vision.distill.report LABEL=DIR [LABEL=DIR ...]``.

Reads each run's ``history.json`` and prints one markdown row per run with the validation
numbers of its best distillation epoch (the epoch ``tinyvae_best.pth`` holds): student PSNR and
SSIM, teacher PSNR and SSIM, the quality ratio (student PSNR / teacher PSNR), the latent CKA of
the adapted student latent with the teacher latent (``cka``) and of the raw student latent
(``cka_raw``, comparable between runs with and without distillation), and the training time.
A directory whose history has teacher pre-training epochs also gets a teacher row.
``--epoch N`` reports epoch N of each phase instead (equal-epoch comparisons from longer runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .state import BEST_METRIC, improves

COLUMNS = ("psnr", "ssim", "teacher_psnr", "teacher_ssim", "quality_ratio", "cka", "cka_raw")


def best_record(history: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    """The best ``phase`` epoch by the trainer's rule (what ``*_best.pth`` holds: the first
    epoch no later epoch improves on, see :func:`hrm_vision.distill.state.improves`)."""
    best = None
    for r in history:
        if r["phase"] == phase and (best is None or improves(r["val"][BEST_METRIC],
                                                             best["val"][BEST_METRIC])):
            best = r
    return best


def pick(history: list[dict[str, Any]], phase: str, epoch: int | None) -> dict[str, Any] | None:
    """The best record of ``phase``, or its record at ``epoch`` when given."""
    if epoch is None:
        return best_record(history, phase)
    return next((r for r in history if r["phase"] == phase and r["epoch"] == epoch), None)


def rows(label: str, directory: Path, epoch: int | None = None) -> list[str]:
    history = json.loads((directory / "history.json").read_text())
    out = []
    teacher = pick(history, "teacher", epoch)
    if teacher is not None:
        n = teacher["epoch"] if epoch else sum(1 for r in history if r["phase"] == "teacher")
        secs = sum(r["time_s"] for r in history
                   if r["phase"] == "teacher" and r["epoch"] <= n)
        out.append(f"| {label}: teacher pre-training | {n} | {teacher['val']['psnr']:.2f} | "
                   f"{teacher['val']['ssim']:.3f} | | | | | | {secs:.0f} |")
    best = pick(history, "distill", epoch)
    if best is not None:
        v = best["val"]
        n = best["epoch"] if epoch else sum(1 for r in history if r["phase"] == "distill")
        secs = sum(r["time_s"] for r in history if r["phase"] == "distill" and r["epoch"] <= n)
        cells = " | ".join("" if v.get(k) is None else
                           (f"{v[k]:.2f}" if "psnr" in k else f"{v[k]:.3f}") for k in COLUMNS)
        epochs = f"{n}" if epoch else f"{n} (best {best['epoch']})"
        out.append(f"| {label} | {epochs} | {cells} | {secs:.0f} |")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of the runs given."""
    parser = argparse.ArgumentParser(prog="python -m hrm_vision.distill.report",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=DIR")
    parser.add_argument("--epoch", type=int, default=None,
                        help="report this epoch of each phase instead of the best one")
    args = parser.parse_args(argv)
    print("| run | epochs | student PSNR (dB) | SSIM | teacher PSNR (dB) | teacher SSIM | "
          "quality ratio | CKA (adapted) | CKA (raw) | train time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.runs:
        label, _, directory = spec.partition("=")
        if not directory:
            parser.error(f"expected LABEL=DIR, got {spec!r}")
        for row in rows(label, Path(directory), args.epoch):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
