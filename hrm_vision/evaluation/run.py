"""The evaluation pipeline: load teacher and student, measure both the same way, write the report.

Reads ``teacher.pth`` (role teacher) and ``tinyvae_best.pth`` (role student, with
``adapter_state_dict``/``adapter_arch``) and produces, for both models and their ratio:

- parameters, weight file size (state dict alone, fp32 and fp16, saved the same way), MACs;
- CPU latency at batch 1 (median, p90) and throughput at the throughput batch for encode,
  decode and both, the two models interleaved in one process;
- PSNR (pooled over the images) and SSIM on the validation split; linear CKA between adapted
  student latents and teacher latents; the PSNR cost of a uint8 student latent;
- the reconstructions a learned model must beat on the same images
  (:mod:`hrm_vision.evaluation.baselines`: bicubic thumbnails, patch PCA fitted on the first
  ``baseline_train_images`` training images), with the numbers each keeps per image;
- rate (:class:`~hrm_vision.evaluation.quality.RateQuality`) for both models: KL in nats per
  latent element and bits per pixel, decode(mu) and decode(z) PSNR (z a posterior sample drawn
  with ``seed``), and the Gaussian water-filling bound and uniform allocation at that rate;
- with the ``photos`` dataset, the same quality and rate on its held-out photographs at full
  resolution (:func:`~hrm_vision.evaluation.quality.held_out_frames`), beside patch PCA with
  the basis fitted on the training crops (PCA-128 is the student's untrained linear start).

Images are float tensors in [0, 1], NCHW, RGB. The command is ``python -m hrm_vision.evaluation``.
"""

from __future__ import annotations

import datetime as dt
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import build_dataset, validation_images
from ..io import (
    adapter_from_payload,
    json_safe,
    load_checkpoint,
    model_from_payload,
    write_json,
    write_text,
)
from ..timing import machine_info
from ..vae import LatentAdapter, VAEBase
from .baselines import PatchPCA, compute_baselines, frame_baselines, patch_spectrum
from .footprint import footprint
from .quality import (
    UINT8_SCHEME,
    QualityResult,
    held_out_frames,
    measure_quality,
    measure_rate,
    pooled_psnr,
)
from .report import figure, markdown, metrics, ratios
from .speed import CAMERA_SIZES, camera_speed, measure_speed


@dataclass
class EvaluationSettings:
    """What to evaluate and how (the command's options)."""

    teacher: Path
    student: Path
    dataset: str = "photos"
    data_dir: str = "./data"
    image_size: int = 32
    num_images: int = 1024
    batch_size: int = 128
    latency_repeats: int = 50
    throughput_repeats: int = 10
    throughput_batch: int = 64
    warmup: int = 2
    baseline_train_images: int = 4096
    frames: bool = True
    seed: int = 0
    #: rounds of the student's camera-resolution timing (64x64 crop, 480x640 frame); 0 skips it
    camera_repeats: int = 3
    command: str = ""


def load_pair(teacher_path: Path, student_path: Path
              ) -> tuple[VAEBase, VAEBase, LatentAdapter | None]:
    """Teacher, student and (if stored) the student-to-teacher adapter, in eval mode on CPU."""
    teacher = model_from_payload(load_checkpoint(teacher_path), "teacher", str(teacher_path))
    payload = load_checkpoint(student_path)
    student = model_from_payload(payload, "student", str(student_path))
    return teacher, student, adapter_from_payload(payload, str(student_path))


def _measure_models(s: EvaluationSettings, models: dict[str, VAEBase], dataset: Any,
                    quality: QualityResult) -> dict[str, dict[str, float]]:
    """Footprint, speed, PSNR and SSIM per model."""
    n = quality.num_images
    result = {k: dict(footprint(m, s.image_size)) for k, m in models.items()}
    images = torch.stack([dataset[i % n] for i in range(s.throughput_batch)])
    for name, speed in measure_speed(models, images, s.latency_repeats, s.throughput_repeats,
                                     s.warmup).items():
        result[name].update(speed)
    for name in models:
        result[name]["psnr_db"] = getattr(quality, f"{name}_psnr_db")
        result[name]["ssim"] = getattr(quality, f"{name}_ssim")
    return result


def _latent_section(q: QualityResult, latent: tuple[int, ...]) -> dict[str, Any]:
    numbers = math.prod(latent)  # (C, h, w), or (C,) for a vector latent
    return {"scheme": UINT8_SCHEME, "psnr_float_db": q.student_psnr_db,
            "psnr_uint8_db": q.student_uint8_psnr_db,
            "psnr_cost_db": q.student_psnr_db - q.student_uint8_psnr_db,
            "ssim_uint8": q.student_uint8_ssim,
            "bytes_float32": 4 * numbers, "bytes_uint8": numbers + 8}


def reconstructions(s: EvaluationSettings, models: dict[str, VAEBase],
                    quality: QualityResult, val: Any, pca: PatchPCA | None
                    ) -> list[dict[str, Any]]:
    """Both models and the baselines on the validation images ``val`` (the first
    ``quality.num_images``): ``{"name", "numbers" (kept per image), "psnr_db"}`` rows (no
    baselines without a ``pca``)."""
    rows = [{"name": name, "numbers": math.prod(m.latent_shape(s.image_size, s.image_size)),
             "psnr_db": getattr(quality, f"{name}_psnr_db")} for name, m in models.items()]
    if pca is None:
        return rows
    return rows + [b.to_dict() for b in compute_baselines(val, pca=pca)]


def rate_rows(s: EvaluationSettings, models: dict[str, VAEBase], images: Any, label: str
              ) -> list[dict[str, Any]]:
    """:func:`~hrm_vision.evaluation.quality.measure_rate` of every model on ``images``."""
    spectrum = patch_spectrum(images)
    return [measure_rate(m, name, images, label, spectrum, s.seed, s.batch_size).to_dict()
            for name, m in models.items()]


def frames_section(s: EvaluationSettings, models: dict[str, VAEBase], pca: PatchPCA | None
                   ) -> dict[str, Any]:
    """Quality and rate on the held-out photographs at full resolution."""
    from ..data import VAL_PHOTOS

    frames = held_out_frames()
    rows = [{"name": name, "numbers": m.latent_dim,
             "psnr_db": pooled_psnr(lambda x, m=m: m.decode(m.encode(x)), frames)}
            for name, m in models.items()]
    if pca is not None:
        rows += [b.to_dict() for b in frame_baselines(frames, pca)]
    return {"photos": [{"name": n, "height": x.shape[-2], "width": x.shape[-1]}
                       for n, x in zip(VAL_PHOTOS, frames, strict=True)],
            "reconstructions": rows,
            "rate": rate_rows(s, models, frames, "frames")}


def evaluate(s: EvaluationSettings) -> dict[str, Any]:
    """Run every measurement and return the report dict (what ``evaluation.json`` holds, plus
    ``samples``: the images of the figure)."""
    teacher, student, adapter = load_pair(s.teacher, s.student)
    dataset = build_dataset(s.dataset, "val", image_size=s.image_size, data_dir=s.data_dir)
    quality = measure_quality(teacher, student, adapter, dataset, s.num_images, s.batch_size)
    models = {"teacher": teacher, "student": student}
    result = _measure_models(s, models, dataset, quality)
    val = validation_images(s.dataset, quality.num_images, s.image_size, s.data_dir)
    pca = (PatchPCA(validation_images(s.dataset, s.baseline_train_images, s.image_size,
                                      s.data_dir, split="train"))
           if s.baseline_train_images > 0 else None)
    with_frames = s.frames and s.dataset == "photos"
    return {
        "command": s.command,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "checkpoints": {"teacher": str(s.teacher), "student": str(s.student)},
        "dataset": {"name": s.dataset, "split": "val", "num_images": quality.num_images,
                    "image_size": s.image_size},
        "timing": {"threads": torch.get_num_threads(), "latency_repeats": s.latency_repeats,
                   "throughput_repeats": s.throughput_repeats,
                   "throughput_batch": s.throughput_batch, "warmup": s.warmup},
        "teacher": result["teacher"],
        "student": result["student"],
        "ratios": ratios(result["teacher"], result["student"], metrics(s.throughput_batch)),
        "alignment": {"cka_adapted": quality.cka_adapted,
                      "cka_unadapted": quality.cka_unadapted,
                      "cross_psnr_db": quality.cross_psnr_db},
        "latent_uint8": _latent_section(quality, student.latent_shape(s.image_size,
                                                                      s.image_size)),
        "reconstructions": reconstructions(s, models, quality, val, pca),
        "rate": rate_rows(s, models, val, f"{s.image_size}x{s.image_size} crops"),
        "frames": frames_section(s, models, pca) if with_frames else None,
        **({"camera": _camera(student, s.camera_repeats)} if s.camera_repeats else {}),
        "samples": quality.samples,
    }


def _camera(student: VAEBase, repeats: int) -> dict[str, Any]:
    """The student's single-frame latency at camera resolution, eager, against this machine's
    3x3 convolution (:func:`hrm_vision.evaluation.speed.camera_speed`)."""
    from ..export.runtime import chain, eager_runner

    runners = {"eager (default)": lambda x: student.decode(student.encode(x)),
               "eager (channels_last)": chain(eager_runner(student, "encode"),
                                              eager_runner(student, "decode"))}
    return camera_speed(student, runners, CAMERA_SIZES, repeats)


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``evaluation.json`` (non-finite values as null, with a warning), ``evaluation.md``
    and ``evaluation.png`` into ``out_dir``."""
    report = dict(report)
    samples = report.pop("samples", {})
    if json_safe(report) != report:
        print("warning: the report holds non-finite values (written as null)", file=sys.stderr)
    paths = {"json": out_dir / "evaluation.json", "markdown": out_dir / "evaluation.md",
             "png": out_dir / "evaluation.png"}
    write_json(report, paths["json"], indent=2)
    write_text(markdown(report), paths["markdown"])
    figure(report, samples, paths["png"])
    return paths
