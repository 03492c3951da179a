#!/usr/bin/env python
"""Compare finished runs: ``python training/runs.py LABEL=DIR[,DIR...] ...``.

Reads each run's ``history.json`` (and ``config.json`` for its seed) and prints one markdown row
per label with the validation numbers of each run's best distillation epoch (the epoch
``tinyvae_best.pth`` holds unless a better fine-tuning epoch followed): student PSNR and SSIM,
teacher PSNR, the latent CKA of the adapted student latent with the teacher latent (``cka``) and
of the raw student latent (``cka_raw``, comparable between runs with and without distillation),
the cross-decoding PSNR (the teacher's decoder on the adapted student latent) and the training
time in seconds.

- Several directories after one label (``LABEL=DIR1,DIR2,DIR3``, for example one per seed) give
  the mean and the sample standard deviation (``mean ± sd``) of each column.
- ``--baseline LABEL`` adds the student PSNR gain over that label's runs, paired by seed (the
  runs of one seed share their validation crops): the mean and spread of the per-seed gains.
- A directory whose history has teacher pre-training epochs also gets a teacher row.
- ``--epoch N`` reports epoch N of each phase instead of the best one.

A missing, malformed or crafted ``history.json`` (deep nesting, a 5000-digit number, records
without their fields) is one line naming the file, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrm_vision.train.config import read_json
from hrm_vision.train.trainer import BEST_METRIC

PROG = "training/runs.py"
#: The fields of a ``history.json`` record this command reads, with their JSON types.
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {"phase": str, "epoch": int,
                                                     "time_s": (int, float), "val": dict}

#: (history key, column title, decimals) of the per-run columns.
COLUMNS = (("psnr", "student PSNR (dB)", 2), ("psnr_sample", "decode(z) PSNR (dB)", 2),
           ("kl_per_element", "KL (nats/element)", 3), ("ssim", "SSIM", 4),
           ("teacher_psnr", "teacher PSNR (dB)", 2), ("cka", "CKA (adapted)", 3),
           ("cka_raw", "CKA (raw)", 3), ("cross_psnr", "cross-decoding PSNR (dB)", 2))


#: The columns a teacher pre-training record has.
TEACHER_COLUMNS = ("psnr", "psnr_sample", "kl_per_element", "ssim")


def best_record(history: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    """The best ``phase`` epoch by the trainer's rule (what ``*_best.pth`` holds: the first
    epoch no later epoch beats, see :data:`hrm_vision.train.trainer.BEST_METRIC`)."""
    best = None
    for r in history:
        if r["phase"] == phase and (best is None
                                    or r["val"][BEST_METRIC] > best["val"][BEST_METRIC]):
            best = r
    return best


def pick(history: list[dict[str, Any]], phase: str, epoch: int | None) -> dict[str, Any] | None:
    """The best record of ``phase``, or its record at ``epoch`` when given."""
    if epoch is None:
        return best_record(history, phase)
    return next((r for r in history if r["phase"] == phase and r["epoch"] == epoch), None)


@dataclass
class Run:
    """One run's numbers: ``values`` per column key, ``seed``, ``epochs`` (run length and best
    epoch) and the phase's training ``seconds`` up to the reported epoch."""

    seed: int | None
    values: dict[str, float | None]
    epochs: int
    best_epoch: int
    seconds: float


def read_history(path: Path) -> list[dict[str, Any]]:
    """The epoch records of a ``history.json``: a list of objects with :data:`RECORD_FIELDS`
    and a numeric ``val[BEST_METRIC]``.

    Raises:
        OSError: the file cannot be read.
        ValueError: not JSON this parser reads (syntax, nesting too deep, a huge number) or
            not a list of such records; one line naming the file.
    """
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # syntax, UTF-8, a 5000-digit number, nesting
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a history.json this command can read: "
                         f"{type(exc).__name__}: {first}") from None
    if not isinstance(history, list):
        raise ValueError(f"{path} must hold a list of epoch records, got "
                         f"{type(history).__name__}")
    for i, record in enumerate(history):
        bad = ([k for k, t in RECORD_FIELDS.items() if not isinstance(record.get(k), t)]
               if isinstance(record, dict) else list(RECORD_FIELDS))
        if not bad and not isinstance(record["val"].get(BEST_METRIC), (int, float)):
            bad = [f"val.{BEST_METRIC}"]
        if bad:
            raise ValueError(f"{path}: record {i} lacks or mistypes {', '.join(bad)}")
    return history


def read_run(directory: Path, phase: str, epoch: int | None) -> Run | None:
    """The ``phase`` numbers of the run in ``directory``; ``None`` without such epochs."""
    history = read_history(directory / "history.json")
    record = pick(history, phase, epoch)
    if record is None:
        return None
    config = directory / "config.json"
    seed = read_json(config).get("seed") if config.is_file() else None
    n = record["epoch"] if epoch else sum(1 for r in history if r["phase"] == phase)
    seconds = sum(r["time_s"] for r in history if r["phase"] == phase and r["epoch"] <= n)
    return Run(seed, {k: record["val"].get(k) for k, _, _ in COLUMNS}, n, record["epoch"],
               seconds)


def summarise(values: Sequence[float | None], decimals: int) -> str:
    """``mean`` of one value, ``mean ± sd`` of several; empty when any is missing."""
    if not values or any(v is None for v in values):
        return ""
    if len(values) == 1:
        return f"{values[0]:.{decimals}f}"
    return f"{statistics.mean(values):.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"


def paired_gain(runs: Sequence[Run], baseline: Sequence[Run]) -> str:
    """Student PSNR minus the baseline's for each seed both have: ``mean ± sd (n seeds)``."""
    base = {r.seed: r.values["psnr"] for r in baseline}
    gains = [r.values["psnr"] - base[r.seed] for r in runs if r.seed in base]
    if not gains:
        return ""
    text = summarise(gains, 2)
    return f"{'+' if statistics.mean(gains) >= 0 else ''}{text} ({len(gains)})"


def row(label: str, runs: Sequence[Run], gain: str | None, chosen: bool = False) -> str:
    """One markdown row of ``runs`` (one label); ``chosen``: an epoch given by the user, not
    each run's best, is reported."""
    epochs = "/".join(map(str, sorted({r.epochs for r in runs})))
    best = "/".join(map(str, sorted({r.best_epoch for r in runs})))
    cells = [label, str(len(runs)), epochs if chosen else f"{epochs} (best {best})"]
    cells += [summarise([r.values[k] for r in runs], d) for k, _, d in COLUMNS]
    if gain is not None:
        cells.append(gain)
    cells.append(summarise([r.seconds for r in runs], 0))
    return "| " + " | ".join(cells) + " |"


def teacher_rows(label: str, directories: Sequence[Path], epoch: int | None,
                 gain_column: bool) -> list[str]:
    """A row for the teacher pre-training of each directory that has one."""
    out = []
    for directory in directories:
        run = read_run(directory, "teacher", epoch)
        if run is not None:
            cells = [f"{label}: teacher pre-training", "1",
                     str(epoch) if epoch else f"{run.epochs} (best {run.best_epoch})"]
            cells += [summarise([run.values[k]], d) if k in TEACHER_COLUMNS else ""
                      for k, _, d in COLUMNS] + [""] * gain_column
            out.append("| " + " | ".join(cells + [f"{run.seconds:.0f}"]) + " |")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of the runs given."""
    parser = argparse.ArgumentParser(prog=PROG,
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=DIR[,DIR...]")
    parser.add_argument("--epoch", type=int, default=None,
                        help="report this epoch of each phase instead of the best one")
    parser.add_argument("--baseline", default=None, metavar="LABEL",
                        help="add each label's PSNR gain over this label, paired by seed")
    args = parser.parse_args(argv)
    specs: dict[str, list[Path]] = {}
    for spec in args.runs:
        label, _, dirs = spec.partition("=")
        if not dirs:
            parser.error(f"expected LABEL=DIR[,DIR...], got {spec!r}")
        specs[label] = [Path(d) for d in dirs.split(",")]
    if args.baseline is not None and args.baseline not in specs:
        parser.error(f"--baseline {args.baseline!r} is none of the labels {list(specs)}")
    runs = {label: [r for d in dirs if (r := read_run(d, "distill", args.epoch)) is not None]
            for label, dirs in specs.items()}
    titles = ["run", "runs", "epochs"] + [t for _, t, _ in COLUMNS]
    if args.baseline is not None:
        titles.append(f"PSNR gain over {args.baseline}, per seed (dB)")
    titles.append("train time (s)")
    print("| " + " | ".join(titles) + " |")
    print("|" + "---|" * len(titles))
    for label, dirs in specs.items():
        for line in teacher_rows(label, dirs, args.epoch, args.baseline is not None):
            print(line)
        if runs[label]:
            gain = (None if args.baseline is None else "" if label == args.baseline
                    else paired_gain(runs[label], runs[args.baseline]))
            print(row(label, runs[label], gain, chosen=args.epoch is not None))
    return 0


if __name__ == "__main__":
    from hrm_vision.cli import run_main

    sys.exit(run_main(PROG, main))
