#!/usr/bin/env python
"""The learning benchmark (``make learn``): networks trained on streamed crops of the wallpaper
corpus, beside what PCA and thumbnails of the same crops give.

    python benchmarks/learn.py                       # about 80 min on 2 cores
    python benchmarks/learn.py --scale 0.01 --out-dir /tmp/learn   # the machinery, in a minute
    python benchmarks/learn.py --ship                # then copy the best students into the package

Builds the corpus once (``benchmarks/corpus.py``: ``CORPUS/train`` and ``CORPUS/val``, split by
picture), then four runs of the package's trainer (:class:`hrm_vision.train.Distiller`), each in
``OUT/<run>``, on crops streamed from the training pictures (``crops: stream``, dataset
``imagefolder``), validated on fixed crops of the held-out pictures and of an unseen source
(``unseen_dataset``):

* ``teacher``: the compact teacher (512 numbers per 64x64 crop) alone, ``OUT/teacher/teacher.pth``,
  with the config's ``teacher`` fields over ``compact``'s (a learning rate of 2e-4 and no early
  stop: at the students' 1e-3 it fell 0.66 dB under its PCA start in 374 steps; at 2e-4 it dips
  0.03 dB for about 500 steps, then rises to +0.12 dB at 1,000,
  ``experiments/results/teacher_lr.jsonl``), on crops cut at the scales of ``compact``
  (0.125-0.5: squares of 128-512 pixels reduced to 64; at the default 0.25-1 it ended under
  crop PCA-512 fitted on the students' crops);
* ``distilled``: the compact student (64 numbers) distilled from that teacher, on the same crops;
* ``alone``: the same student without distillation, at equal image weight (``recon_weight`` is
  ``recon_weight + distill_recon_weight``, the distillation weights 0; as ``make compact``);
* ``spatial``: the spatial student (TinyVAE, 128 channels on the H/8 x W/8 grid, 32x32 crops)
  alone, the model ``hrm_vision.load("tinyvae")`` ships.

The budget is in steps (``steps`` of the config times ``--scale``, 2 by default), not in
minutes: 2,000 teacher, 2 x 16,000 compact-student and 3,000 spatial steps at batch 64 took
77 minutes of runs on a 2-core AMD EPYC at load 1.1-2.8 (teacher 3.3, distilled 7.8, alone
13.9, spatial 10.3 steps/s in training, validations and checkpoints besides;
benchmarks/results/learn.json), 91 minutes the run before (4.0, 6.5, 11.9, 7.1 steps/s): the
machine moves the steps per second by up to a third. Each run trains on ``threads`` torch
threads, or on its own in ``run_threads``: the alone student on one beside its crop worker,
1.31-1.34x faster than on two, while the other runs gain nothing on one
(``experiments/loop_speed.py``); the teacher and the spatial student cut their crops on the
training thread (``num_workers`` 0: the teacher's loop 1.09-1.16x faster so, interleaved at its
80-step epochs, ``experiments/results/loop_speed_teacher80.json``; the spatial student's in
``experiments/results/loop_speed_runs.json``).
The students' wider crops cost steps per second (8.8 and 12.4 at 0.25-1) and bought 0.24 dB
held-out (docs/results.md). At ``--scale 1`` (38 minutes, 0.25-1) the students ended 0.23 dB
lower than at 2.
Each run validates every ``ceil(steps / validations)`` steps (one epoch of that many streamed
batches); the best checkpoint is the best held-out PSNR.

Writes ``OUT/learn.json``: per run its checkpoint, steps, training seconds and steps/s (``runs``,
``checkpoints``); the table rows (:func:`compact_table` of ``training/compact.py``: PSNR and rate
on the held-out and unseen-source crops, beside crop PCA-16/64/512 fitted on the same training
crops and 5x5/8x8 thumbnails; the spatial student beside patch PCA-128); and ``OUT/curves.png``
(held-out and unseen PSNR against the step for the three compact runs); ``criteria``, the
targets of the learning work measured on them (student >= crop PCA-64 + 1 dB and above the 8x8
thumbnail, teacher >= student + 3 dB and >= its PCA-512, distilled >= alone + 0.3 dB or alone's
final PSNR in at most 60% of the steps, no held-out curve ending below its start). Prints the
tables and the targets as Markdown. Resumable: a run recorded in ``learn.json`` whose
checkpoint exists is skipped, an interrupted one continues from its ``*_last.pth``.

``--ship`` writes the best compact student (distilled or alone, by held-out PSNR) and the spatial
student to ``hrm_vision/weights/`` as ``compact_student.safetensors`` and
``tinyvae.safetensors`` (:func:`hrm_vision.save`), in float16 when that keeps both PSNRs within
:data:`FP16_TOLERANCE_DB` of float32, else float32, each with a sidecar ``NAME.json``: the corpus
packages, versions and licences, steps and PSNRs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

import hrm_vision
from hrm_vision._extras import require
from hrm_vision.evaluate import CROP_PCA_FIT, PatchPCA, compute_baselines
from hrm_vision.io import WEIGHTS_DIR, describe_validation_error, write_json
from hrm_vision.train import Distiller, load_config
from hrm_vision.train.config import ConfigError, DistillConfig, read_json
from hrm_vision.train.trainer import TrainingInterrupted, build_split, first_images

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "training"), str(ROOT / "benchmarks")]
import corpus as corpus_builder  # noqa: E402
from compact import (  # noqa: E402
    best_epoch,
    compact_table,
    decoded_psnr,
    markdown_table,
    vae_coder,
)

PROG = "benchmarks/learn.py"
RUNS = ("teacher", "distilled", "alone", "spatial")
COMPACT_RUNS = ("teacher", "distilled", "alone")
PCA_SIZES = (16, 64, 512)  #: crop PCA baselines of the compact table
PATCH_PCA = 128  #: the spatial student's numbers per 8x8 patch, and its patch-PCA baseline
FP16_TOLERANCE_DB = 0.01  #: shipped in float16 when both PSNRs move at most this much
SHIPPED = {"compact_student": "compact", "tinyvae": "spatial"}  #: name -> the table row it is


class Steps(BaseModel):
    """Optimizer steps of each run (``--scale`` multiplies them)."""

    model_config = ConfigDict(extra="forbid")

    teacher: int = Field(ge=1, description="the compact teacher")
    student: int = Field(ge=1, description="each compact student (distilled, alone)")
    spatial: int = Field(ge=1, description="the spatial student")


class RunThreads(BaseModel):
    """Torch threads of a run that trains faster on other than ``threads`` (unset: ``threads``)."""

    model_config = ConfigDict(extra="forbid")

    teacher: int | None = Field(None, ge=1)
    distilled: int | None = Field(None, ge=1)
    alone: int | None = Field(None, ge=1)
    spatial: int | None = Field(None, ge=1)


class LearnConfig(BaseModel):
    """``benchmarks/learn.json``: where, how long, and the DistillConfig fields of the runs."""

    model_config = ConfigDict(extra="forbid")

    corpus: str = Field(description="the corpus folder (built there when missing)")
    out_dir: str = Field(description="the runs' folders and learn.json")
    steps: Steps
    validations: int = Field(ge=1, description="validations per run")
    pca_crops: int = Field(ge=2, le=CROP_PCA_FIT, description="streamed training crops the "
                           "PCA baselines are fitted on")
    threads: int = Field(ge=1, description="torch threads of the evaluation and of every run "
                         "not in run_threads")
    run_threads: RunThreads = Field(default_factory=RunThreads)
    compact: dict[str, Any] = Field(description="DistillConfig fields of the compact runs")
    teacher: dict[str, Any] = Field(default_factory=dict, description="DistillConfig fields "
                                    "of the teacher run over compact's")
    spatial: dict[str, Any] = Field(description="DistillConfig fields of the spatial run")

    def threads_of(self, run: str) -> int:
        """Torch threads ``run`` (a name of :data:`RUNS`) trains on."""
        threads: int | None = getattr(self.run_threads, run)
        return self.threads if threads is None else threads


def read_json_file(path: str | Path) -> Any:
    """The JSON value in ``path`` (a history list, a manifest, learn.json)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def learn_config(path: str) -> LearnConfig:
    """``path`` validated; a ``ConfigError`` naming every bad field."""
    try:
        return LearnConfig.model_validate(read_json(path))
    except ValidationError as exc:
        problems = describe_validation_error(exc, LearnConfig.model_fields)
        raise ConfigError(f"invalid learn config {path}: {problems}") from None


def run_configs(cfg: LearnConfig, scale: float, corpus: Path, out: Path
                ) -> dict[str, DistillConfig]:
    """The :data:`RUNS` configs, each checked (one-line ``ConfigError``) before anything runs:
    ``steps * scale`` steps (at least one) in ``validations`` epochs of streamed crops (fewer
    when an epoch would hold fewer crops than the model's PCA start needs; the steps are then
    rounded up to whole epochs)."""

    def make(base: dict[str, Any], steps: float, name: str, **fields: Any) -> DistillConfig:
        steps = max(1, round(steps * scale))
        batch = base.get("batch_size", 64)
        # a model's PCA start needs more crops than its latent numbers: fewer, longer epochs
        latent = base.get("teacher_latent_dim" if name == "teacher" else "student_latent_dim", 0)
        per_epoch = max(math.ceil(steps / cfg.validations), math.ceil((latent + 1) / batch))
        epochs = math.ceil(steps / per_epoch)
        phase = {"teacher_epochs": epochs, "epochs": 0} if name == "teacher" else {
            "teacher_epochs": 0, "epochs": epochs}
        values = {**base, "dataset": "imagefolder", "data_dir": str(corpus),
                  "train_samples": per_epoch * batch,
                  "finetune_epochs": 0, "checkpoint_dir": str(out / name), **phase, **fields}
        return load_config(None, values)

    steps = cfg.steps
    distilled = make(cfg.compact, steps.student, "distilled",
                     teacher_checkpoint=str(out / "teacher" / "teacher.pth"))
    return {
        "teacher": make({**cfg.compact, **cfg.teacher}, steps.teacher, "teacher"),
        "distilled": distilled,
        "alone": make(cfg.compact, steps.student, "alone",
                      recon_weight=distilled.recon_weight + distilled.distill_recon_weight,
                      distill_latent_weight=0.0, distill_recon_weight=0.0),
        "spatial": make(cfg.spatial, steps.spatial, "spatial"),
    }


def run_record(config: DistillConfig, files: dict[str, Path], wall_s: float, threads: int
               ) -> dict[str, Any]:
    """What ``learn.json`` keeps of a finished run: its checkpoint, steps (epochs run times
    steps per epoch), training seconds (the epochs' ``time_s``, validation excluded), steps/s,
    torch threads."""
    phase = "teacher" if config.epochs == 0 else "distill"
    records = [r for r in read_json_file(files["history"]) if r["phase"] == phase]
    per_epoch = config.train_samples // config.batch_size  # type: ignore[operator]
    steps = max(r["epoch"] for r in records) * per_epoch
    seconds = sum(r["time_s"] for r in records)
    checkpoint = files["teacher"] if phase == "teacher" else files["best"]
    return {"checkpoint": str(checkpoint), "history": str(files["history"]), "phase": phase,
            "steps": steps, "steps_per_epoch": per_epoch, "train_s": seconds,
            "wall_s": wall_s, "steps_per_s": steps / seconds if seconds > 0 else None,
            "threads": threads}


def train(configs: dict[str, DistillConfig], learn: dict[str, Any], path: Path,
          cfg: LearnConfig) -> None:
    """Run every config not yet recorded in ``learn["runs"]`` (with its checkpoint present) on
    its torch threads (``cfg.threads_of``), continuing an interrupted one; ``learn`` is written
    to ``path`` after each run. Leaves torch at ``cfg.threads``."""
    for name, config in configs.items():
        done = learn["runs"].get(name)
        if done and Path(done["checkpoint"]).is_file():
            print(f"{name}: done ({done['steps']} steps, {done['checkpoint']}), skipped")
            continue
        threads = cfg.threads_of(name)
        print(f"{name}: training on {threads} torch threads ({config.checkpoint_dir})", flush=True)
        torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            files = Distiller(config).run(resume="auto")
        finally:
            torch.set_num_threads(cfg.threads)
        if name == "teacher":
            files["teacher"] = Path(config.checkpoint_dir) / "teacher.pth"
        learn["runs"][name] = run_record(config, files, time.perf_counter() - started, threads)
        learn["checkpoints"] = {k: r["checkpoint"] for k, r in learn["runs"].items()}
        write_json(learn, path)


def evaluation_sets(config: DistillConfig, pca_crops: int) -> tuple[dict[str, Tensor], Tensor]:
    """``({"held_out", "unseen"}, training crops)``: the validation and unseen-source crops the
    trainer validates on, and the first ``pca_crops`` crops of the training stream's first
    epoch (the baselines' fit), all ``(N, 3, S, S)`` in [0, 1]."""
    sets = {key: first_images(ds, len(ds)) for key, ds in (
        ("held_out", build_split(config, "val")), ("unseen", build_split(config, "unseen")))}
    train_set = build_split(config.model_copy(update={"train_samples": pca_crops}), "train")
    return sets, first_images(train_set, pca_crops)


def spatial_rows(model: torch.nn.Module, config: DistillConfig, pca_crops: int
                 ) -> list[dict[str, Any]]:
    """The spatial student and patch PCA-:data:`PATCH_PCA` (fitted on its training crops) on
    its held-out and unseen crops: ``{"name", "numbers", "psnr_db": {set: dB}}``."""
    sets, train_crops = evaluation_sets(config, pca_crops)
    cells = (config.image_size // 8) ** 2
    rows = [{"name": f"spatial student (TinyVAE, {config.student_latent_dim} channels)",
             "numbers": config.student_latent_dim * cells,
             "psnr_db": {k: decoded_psnr(model.encode, model.decode, x) for k, x in sets.items()}}]
    pca = PatchPCA(train_crops)
    base = {k: compute_baselines(x, pca, sides=(), coefficients=(PATCH_PCA,))[0]
            for k, x in sets.items()}
    b = next(iter(base.values()))
    rows.append({"name": b.name, "numbers": b.numbers,
                 "psnr_db": {k: r.psnr_db for k, r in base.items()}})
    return rows


def evaluate(configs: dict[str, DistillConfig], learn: dict[str, Any], pca_crops: int) -> None:
    """``learn["rows"]`` (the compact table) and ``learn["spatial_rows"]``."""
    runs = learn["runs"]
    coders = [vae_coder(label, hrm_vision.load(runs[name]["checkpoint"], role=role),
                        best_epoch(runs[name]["history"], (runs[name]["phase"],)))
              for label, name, role in (("compact teacher", "teacher", "teacher"),
                                        ("compact student, distilled", "distilled", "student"),
                                        ("compact student, alone", "alone", "student"))]
    sets, train_crops = evaluation_sets(configs["distilled"], pca_crops)
    learn["rows"] = compact_table(coders, sets, train_crops, coefficients=PCA_SIZES)
    spatial = hrm_vision.load(runs["spatial"]["checkpoint"], role="student")
    learn["spatial_rows"] = spatial_rows(spatial, configs["spatial"], pca_crops)
    learn["spatial_image_size"] = configs["spatial"].image_size


def curves(learn: dict[str, Any], path: Path) -> Path | None:
    """Held-out (and unseen-source, when logged) PSNR against the step of the three compact
    runs, with the crop-PCA baselines as lines; None (and a note) without matplotlib."""
    try:
        plt = require("matplotlib.pyplot", extra="train", purpose="the learning curves")
    except ImportError as exc:
        print(f"curves skipped: {exc}")
        return None
    keys = [("psnr", "held_out", "held-out"), ("unseen_psnr", "unseen", "unseen source")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, column, label) in zip(axes, keys, strict=True):
        for name in COMPACT_RUNS:
            run = learn["runs"][name]
            records = [r for r in read_json_file(run["history"]) if r["phase"] == run["phase"]
                       and key in r["val"]]
            ax.plot([r["epoch"] * run["steps_per_epoch"] for r in records],
                    [r["val"][key] for r in records], marker=".", label=name)
        rows = {r["name"]: r for r in learn.get("rows", [])}
        for k, style in ((64, "--"), (512, ":")):
            if f"crop PCA, {k} coefficients" in rows:
                ax.axhline(rows[f"crop PCA, {k} coefficients"]["psnr_db"][column], ls=style,
                           lw=1, color="grey", label=f"crop PCA-{k}")
        ax.set(xlabel="step", ylabel="PSNR (dB)", title=f"{label} crops")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def licenses(corpus: Path) -> dict[str, dict[str, Any]]:
    """Per corpus package: its version, the ``License:`` names of its copyright file and the
    file's path in the corpus."""
    manifest = read_json_file(corpus / "manifest.json")
    out = {}
    for package, info in manifest["packages"].items():
        text = (corpus / info["license"]).read_text(encoding="utf-8", errors="replace")
        # machine-readable ``License:`` fields, and the free-text "Licensed under ... License"
        names = sorted({m.strip() for m in re.findall(r"^License:[ \t]*(\S.*)$", text, re.M)}
                       | {m.strip() for m in re.findall(r"Licensed under ([^\n]+? License)", text)})
        out[package] = {"version": info["version"], "licenses": names,
                        "copyright_file": info["license"]}
    return out


def ship(learn: dict[str, Any], configs: dict[str, DistillConfig], corpus: Path,
         folder: Path) -> dict[str, dict[str, Any]]:
    """Write the shipped weights and sidecars into ``folder`` (see the module docstring)."""
    rows = {r["name"]: r for r in learn["rows"]}
    distilled, alone = rows["compact student, distilled"], rows["compact student, alone"]
    student = ("distilled" if distilled["psnr_db"]["held_out"] >= alone["psnr_db"]["held_out"]
               else "alone")
    choice = {"compact_student": student, "tinyvae": "spatial"}
    manifest = read_json_file(corpus / "manifest.json")
    splits = [m["split"] for m in manifest["images"]]
    shipped = {}
    for name, run in choice.items():
        config = configs[run]
        model = hrm_vision.load(learn["runs"][run]["checkpoint"], role="student")
        sets, _ = evaluation_sets(config, 2)
        measured = {k: decoded_psnr(model.encode, model.decode, x) for k, x in sets.items()}
        target = folder / f"{name}.safetensors"
        hrm_vision.save(copy.deepcopy(model).half(), target)
        half = hrm_vision.load(target)
        half_psnr = {k: decoded_psnr(half.encode, half.decode, x) for k, x in sets.items()}
        storage = "float16"
        if any(abs(half_psnr[k] - measured[k]) > FP16_TOLERANCE_DB for k in sets):
            hrm_vision.save(model, target)
            storage, half_psnr = "float32", measured
        record = {
            "name": name, "model": config.student_model, "role": "student", "run": run,
            "image_size": config.image_size, "storage": storage,
            "steps": learn["runs"][run]["steps"], "psnr_db": half_psnr,
            "psnr_db_float32": measured,
            "trained_on": {"corpus": "benchmarks/corpus.py (Debian desktop-wallpaper packages)",
                           "max_side": manifest["max_side"],
                           "train_images": splits.count("train"),
                           "val_images": splits.count("val"),
                           "crops": f"streamed {config.image_size}x{config.image_size} crops "
                                    f"(random position, scale {config.crop_scale_min:g} to "
                                    f"{config.crop_scale_max:g}, flips)",
                           "packages": licenses(corpus)},
            "unseen_source": "scikit-image's bundled photographs (evaluation only)",
        }
        write_json(record, folder / f"{name}.json")
        shipped[name] = record
        print(f"shipped {target} ({storage}, {target.stat().st_size / 1e6:.1f} MB, "
              f"{run} run): " + ", ".join(f"{k} {v:.2f} dB" for k, v in half_psnr.items()))
    return shipped


def criteria(learn: dict[str, Any]) -> list[dict[str, Any]]:
    """The learning targets measured on ``learn``'s table and curves: ``{"name", "value" (dB,
    or a share of steps), "target", "met"}`` each."""
    rows = {r["name"]: r["psnr_db"] for r in learn["rows"]}
    teacher = rows["compact teacher"]
    distilled, alone = rows["compact student, distilled"], rows["compact student, alone"]
    out: list[dict[str, Any]] = []

    def check(name: str, value: float | None, target: float) -> None:
        out.append({"name": name, "value": value, "target": target,
                    "met": value is not None and value >= target})

    for key, label in (("held_out", "held-out"), ("unseen", "unseen")):
        for student, who in ((distilled, "distilled"), (alone, "alone")):
            if "crop PCA, 64 coefficients" in rows:
                check(f"{who} student - crop PCA-64, {label} (dB)",
                      student[key] - rows["crop PCA, 64 coefficients"][key], 1.0)
            check(f"{who} student - thumbnail 8x8, {label} (dB)",
                  student[key] - rows["thumbnail 8x8, bicubic"][key], 0.0)
        check(f"teacher - distilled student, {label} (dB)", teacher[key] - distilled[key], 3.0)
        if "crop PCA, 512 coefficients" in rows:
            check(f"teacher - crop PCA-512, {label} (dB)",
                  teacher[key] - rows["crop PCA, 512 coefficients"][key], 0.0)
    check("distilled - alone, held-out, same steps (dB)",
          distilled["held_out"] - alone["held_out"], 0.3)
    curves = {name: [r["val"]["psnr"] for r in read_json_file(learn["runs"][name]["history"])
                     if r["phase"] == learn["runs"][name]["phase"]] for name in COMPACT_RUNS}
    reached = [i for i, v in enumerate(curves["distilled"]) if v >= curves["alone"][-1]]
    share = (reached[0] + 1) / len(curves["distilled"]) if reached else None
    out.append({"name": "share of the distilled run's steps to reach the alone run's final "
                "held-out PSNR", "value": share, "target": 0.6,
                "met": share is not None and share <= 0.6})
    for name, curve in curves.items():
        check(f"{name}: last held-out validation - first (dB)", curve[-1] - curve[0], 0.0)
    return out


def print_table(learn: dict[str, Any]) -> None:
    runs = learn["runs"]
    print("\n| run | steps | steps/s (training) | wall (s) |\n|---|---|---|---|")
    for name, r in runs.items():
        rate = f"{r['steps_per_s']:.2f}" if r["steps_per_s"] else "-"
        print(f"| {name} | {r['steps']} | {rate} | {r['wall_s']:.0f} |")
    print("\nCompact codes, 64x64 crops; PSNR of decode(encode(x)) pooled over each set")
    print(markdown_table(learn["rows"]))
    side = learn["spatial_image_size"]
    print(f"\nSpatial student, {side}x{side} crops\n\n| code | numbers per crop | "
          "PSNR held-out (dB) | PSNR unseen sources (dB) |\n|---|---|---|---|")
    for r in learn["spatial_rows"]:
        print(f"| {r['name']} | {r['numbers']} | {r['psnr_db']['held_out']:.2f} | "
              f"{r['psnr_db']['unseen']:.2f} |")
    print("\nTargets\n")
    for c in learn["criteria"]:
        fmt = ".2f" if c["name"].startswith("share") else "+.2f"
        value = "-" if c["value"] is None else format(c["value"], fmt)
        print(f"- {c['name']}: {value} (target {c['target']:g}): "
              f"{'met' if c['met'] else 'NOT met'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Build, train, measure, print, write (and ship); bad input is one line on standard error
    and status 2 (:func:`hrm_vision.cli.run_main`)."""
    from hrm_vision.cli import run_main

    return run_main(PROG, _run, argv)


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "benchmarks" / "learn.json"))
    p.add_argument("--scale", type=float, default=2.0, help="multiply every run's steps")
    p.add_argument("--corpus", default=None, help="default: the config's corpus")
    p.add_argument("--out-dir", default=None, help="default: the config's out_dir")
    p.add_argument("--ship", action="store_true", help="write the best students to the "
                   "package's weights folder")
    p.add_argument("--weights-dir", default=str(WEIGHTS_DIR), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.scale <= 100:
        p.error(f"--scale must be in (0, 100], got {args.scale}")
    cfg = learn_config(args.config)
    corpus, out = Path(args.corpus or cfg.corpus), Path(args.out_dir or cfg.out_dir)
    configs = run_configs(cfg, args.scale, corpus, out)
    torch.set_num_threads(cfg.threads)
    if corpus_builder.usable(corpus) is None:  # reuses the packages in CORPUS/debs
        corpus_builder.build(corpus)
    path = out / "learn.json"
    learn = read_json_file(path) if path.is_file() else {}
    if learn.get("scale") != args.scale:
        learn = {}  # another budget: nothing of it is reused
    learn.update({"config": args.config, "scale": args.scale, "corpus": str(corpus),
                  "threads": cfg.threads,
                  "run_threads": cfg.run_threads.model_dump(exclude_none=True)})
    learn.setdefault("runs", {})
    try:
        train(configs, learn, path, cfg)
    except TrainingInterrupted as exc:  # saved: a rerun continues the run
        print(f"{PROG}: {exc}; rerun the same command to continue", file=sys.stderr)
        return 130 if exc.signame == "SIGINT" else 143
    evaluate(configs, learn, cfg.pca_crops)
    learn["criteria"] = criteria(learn)
    drawn = curves(learn, out / "curves.png")
    learn["curves"] = str(drawn) if drawn else None
    write_json(learn, path)
    print_table(learn)
    print(f"\nwritten {path}")
    if args.ship:
        learn["shipped"] = ship(learn, configs, corpus, Path(args.weights_dir))
        write_json(learn, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
