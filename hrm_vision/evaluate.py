"""Evaluate the distilled student against its teacher: ``python -m hrm_vision.evaluate``.

``python -m hrm_vision.evaluate --checkpoint-dir checkpoints`` reads ``teacher.pth`` (role
teacher) and ``tinyvae_best.pth`` (role student, with ``adapter_state_dict``/``adapter_arch``)
and writes ``evaluation.json``, ``evaluation.md`` and ``evaluation.png`` to ``--out-dir``
(default ``<checkpoint-dir>/evaluation``), with, for both models and their ratio:

- parameters, weight file size (state dict alone, fp32 and fp16, saved the same way), MACs;
- CPU latency at batch 1 (median, p90) and throughput at ``--throughput-batch`` (64) for
  encode, decode and both, the two models interleaved in one process;
- PSNR and SSIM on the validation split; linear CKA between adapted student latents and teacher
  latents; the PSNR cost of a uint8 student latent.

Images are float tensors in [0, 1], NCHW, RGB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .checkpoints import CheckpointError, load_checkpoint, model_from_payload
from .data import build_dataset
from .distill.adapter import LatentAdapter
from .evaluation import footprint, interleaved_timings, measure_quality, summarize_timings
from .evaluation.quality import UINT8_SCHEME
from .evaluation.report import figure, goals, markdown, metrics, ratios
from .vae import VAEBase


def load_pair(teacher_path: Path, student_path: Path
              ) -> tuple[VAEBase, VAEBase, LatentAdapter | None]:
    """Teacher, student and (if stored) the student-to-teacher adapter, in eval mode on CPU."""
    teacher = model_from_payload(load_checkpoint(teacher_path), "teacher", str(teacher_path))
    payload = load_checkpoint(student_path)
    student = model_from_payload(payload, "student", str(student_path))
    adapter = None
    if "adapter_state_dict" in payload and "adapter_arch" in payload:
        try:
            adapter = LatentAdapter(**payload["adapter_arch"])
            adapter.load_state_dict(payload["adapter_state_dict"])
        except (TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{student_path}: cannot rebuild the adapter: {exc}") from exc
        adapter.eval()
    return teacher, student, adapter


def _ops(model: VAEBase, x: Tensor) -> dict[str, Any]:
    z = model.encode(x)
    return {"encode": partial(model.encode, x), "decode": partial(model.decode, z),
            "both": lambda: model.decode(model.encode(x))}


@torch.inference_mode()
def measure_speed(models: dict[str, VAEBase], images: Tensor, latency_repeats: int,
                  throughput_repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Latency at batch 1 and throughput at batch ``len(images)``, all models interleaved.

    Returns per model name: ``latency_{op}_median_ms``, ``latency_{op}_p90_ms`` and
    ``throughput_{op}_ips`` for op in encode, decode, both.
    """
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch, repeats in ((images[:1], latency_repeats), (images, throughput_repeats)):
        fns = {(name, op): fn for name, m in models.items() for op, fn in _ops(m, batch).items()}
        times = interleaved_timings({f"{n}/{op}": f for (n, op), f in fns.items()}, repeats,
                                    warmup, desc=f"timing batch {batch.shape[0]}")
        for (name, op) in fns:
            stats = summarize_timings(times[f"{name}/{op}"], batch.shape[0])
            if batch.shape[0] == 1:
                out[name][f"latency_{op}_median_ms"] = stats["median_ms"]
                out[name][f"latency_{op}_p90_ms"] = stats["p90_ms"]
            else:
                out[name][f"throughput_{op}_ips"] = stats["throughput_ips"]
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, logical CPU count, load average (other jobs on a shared machine), versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average_1_5_15min": load,
            "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "hrm_vision": __version__}


def _finite(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement and return the report dict (what ``evaluation.json`` holds)."""
    ckpt = Path(args.checkpoint_dir)
    teacher_path = Path(args.teacher) if args.teacher else ckpt / "teacher.pth"
    student_path = Path(args.student) if args.student else ckpt / "tinyvae_best.pth"
    teacher, student, adapter = load_pair(teacher_path, student_path)
    dataset = build_dataset(args.dataset, "val", image_size=args.image_size,
                            data_dir=args.data_dir)
    n = min(args.num_images, len(dataset))  # type: ignore[arg-type]

    models = {"teacher": teacher, "student": student}
    result: dict[str, dict[str, float]] = {k: dict(footprint(m, args.image_size))
                                           for k, m in models.items()}
    images = torch.stack([dataset[i % n] for i in range(args.throughput_batch)])
    for name, speed in measure_speed(models, images, args.latency_repeats,
                                     args.throughput_repeats, args.warmup).items():
        result[name].update(speed)
    quality = measure_quality(teacher, student, adapter, dataset, n, args.batch_size)
    for name in models:
        result[name]["psnr_db"] = getattr(quality, f"{name}_psnr_db")
        result[name]["ssim"] = getattr(quality, f"{name}_ssim")

    c, h, w = student.latent_shape(args.image_size, args.image_size)
    report: dict[str, Any] = {
        "command": args.command,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "checkpoints": {"teacher": str(teacher_path), "student": str(student_path)},
        "dataset": {"name": args.dataset, "split": "val", "num_images": quality.num_images,
                    "image_size": args.image_size},
        "timing": {"threads": torch.get_num_threads(), "latency_repeats": args.latency_repeats,
                   "throughput_repeats": args.throughput_repeats,
                   "throughput_batch": args.throughput_batch, "warmup": args.warmup},
        "teacher": result["teacher"],
        "student": result["student"],
        "ratios": ratios(result["teacher"], result["student"], metrics(args.throughput_batch)),
        "alignment": {"cka_adapted": quality.cka_adapted,
                      "cka_unadapted": quality.cka_unadapted},
        "latent_uint8": {"scheme": UINT8_SCHEME, "psnr_float_db": quality.student_psnr_db,
                         "psnr_uint8_db": quality.student_uint8_psnr_db,
                         "psnr_cost_db": quality.student_psnr_db - quality.student_uint8_psnr_db,
                         "ssim_uint8": quality.student_uint8_ssim,
                         "bytes_float32": 4 * c * h * w, "bytes_uint8": c * h * w + 8},
    }
    report["goals"] = goals(report)
    report["samples"] = quality.samples  # removed before writing the JSON
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``evaluation.json``, ``evaluation.md`` and ``evaluation.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = report.pop("samples", {})
    if not _finite(report):
        print("warning: the report holds non-finite values", file=sys.stderr)
    paths = {"json": out_dir / "evaluation.json", "markdown": out_dir / "evaluation.md",
             "png": out_dir / "evaluation.png"}
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(report))
    figure(report, samples, paths["png"])
    return paths


def setup_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hrm_vision.evaluate",
                                description="Teacher vs student: size, speed, quality, CKA.")
    p.add_argument("--checkpoint-dir", default="checkpoints",
                   help="folder with teacher.pth and tinyvae_best.pth (default %(default)s)")
    p.add_argument("--teacher", help="teacher checkpoint (default <checkpoint-dir>/teacher.pth)")
    p.add_argument("--student",
                   help="student checkpoint (default <checkpoint-dir>/tinyvae_best.pth)")
    p.add_argument("--out-dir", help="output folder (default <checkpoint-dir>/evaluation)")
    p.add_argument("--dataset", default="photos", help="dataset name (default %(default)s)")
    p.add_argument("--data-dir", default="./data", help="dataset root, if it needs one")
    p.add_argument("--image-size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--num-images", type=int, default=1024,
                   help="validation images for quality and CKA, at least 2 (default 1024)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="batch size of the quality pass (default 128)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine, multi-threaded "
                        "timings of small convolutions measure threads waiting for each other)")
    p.add_argument("--latency-repeats", type=int, default=50,
                   help="timed rounds at batch 1 (default 50)")
    p.add_argument("--throughput-repeats", type=int, default=10,
                   help="timed rounds at the throughput batch (default 10)")
    p.add_argument("--throughput-batch", type=int, default=64,
                   help="batch size of the throughput measurement (default 64)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = setup_args().parse_args(argv)
    for name in ("num_images", "batch_size", "threads", "latency_repeats",
                 "throughput_repeats", "throughput_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.command = shlex.join(["python", "-m", "hrm_vision.evaluate", *argv])
    torch.set_num_threads(args.threads)
    report = evaluate(args)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.checkpoint_dir) / "evaluation"
    paths = write_report(report, out_dir)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return report


if __name__ == "__main__":
    main()
