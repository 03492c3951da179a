"""``hrm-vision evaluate``: the student against its teacher (footprint, speed, quality, rate,
baselines, full-resolution photographs) into ``evaluation.json``, ``.md`` and ``.png``. Images
are ``(N, 3, H, W)`` in [0, 1], RGB; ratios above 1 mean the student does better."""

from __future__ import annotations

import argparse
import datetime as dt
import math
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import patches
from .data import build_dataset, validation_images
from .io import (
    adapter_from_payload,
    json_safe,
    load_checkpoint,
    model_from_payload,
    write_json,
    write_text,
)
from .metrics import error_image, linear_cka, psnr, psnr_from_mse, ssim
from .patches import PATCH, fit_patch_pca, patch_vectors
from .timing import machine_info, timings
from .train.loss import gaussian_kl
from .vae import VAEBase, count_macs

#: The operations timed for every model.
OPS = ("encode", "decode", "both")
#: Camera-resolution sizes (height, width): a 64x64 crop and a VGA frame.
CAMERA_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (480, 640))
#: Channels in and out of the reference 3x3 convolution.
CONV_CHANNELS = 64
#: How the student latent is stored as uint8 (see :func:`quantize_uint8`).
UINT8_SCHEME = ("per image, per tensor min/max affine: q = round((z - min) / s), "
                "s = (max - min) / 255; min and s travel as two float32 per image")
#: Thumbnail sides and patch-PCA coefficient counts of the baselines.
THUMBNAIL_SIDES: tuple[int, ...] = (8, 16)
PCA_COEFFICIENTS: tuple[int, ...] = (16, 48, 128, 192)
#: Whole-crop baselines of the compact models, and the training crops (at most) PCA is fitted on.
CROP_PCA_COEFFICIENTS: tuple[int, ...] = (16, 64, 256)
CROP_THUMBNAIL_SIDES: tuple[int, ...] = (5, 8)
CROP_PCA_FIT = 4096


def weight_file_bytes(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of ``torch.save(model.state_dict())``, floating-point tensors cast to ``dtype``;
    ``ValueError`` for a non-floating ``dtype``."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    with tempfile.TemporaryFile() as f:
        torch.save(state, f)
        return f.tell()


def footprint(model: VAEBase, image_size: int = 32) -> dict[str, int]:
    """``parameters``, ``weights_fp{32,16}_bytes`` and ``macs_{op}`` per ``image_size``² image."""
    return {"parameters": model.num_parameters(),
            "weights_fp32_bytes": weight_file_bytes(model, torch.float32),
            "weights_fp16_bytes": weight_file_bytes(model, torch.float16),
            **{f"macs_{op}": count_macs(model, image_size, image_size, op) for op in OPS}}


@torch.inference_mode()
def measure_speed(models: dict[str, VAEBase], images: Tensor, latency_repeats: int,
                  throughput_repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Per model: ``latency_{op}_{median,p90}_ms`` (batch 1) and ``throughput_{op}_ips`` (batch
    ``len(images)``), all models interleaved."""
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for latency, batch, repeats in ((True, images[:1], latency_repeats),
                                    (False, images, throughput_repeats)):
        fns = {}
        for name, m in models.items():
            fns[f"{name}/encode"] = partial(m.encode, batch)
            fns[f"{name}/decode"] = partial(m.decode, m.encode(batch))
            fns[f"{name}/both"] = lambda m=m, x=batch: m.decode(m.encode(x))
        times = timings(fns, repeats, warmup, batch.shape[0], f"timing batch {batch.shape[0]}")
        for key, t in times.items():
            name, op = key.split("/")
            out[name].update({f"latency_{op}_median_ms": t["median_ms"],
                              f"latency_{op}_p90_ms": t["p90_ms"]} if latency
                             else {f"throughput_{op}_ips": t["throughput_ips"]})
    return out


def conv_reference(height: int, width: int) -> tuple[Callable[[], Tensor], int]:
    """A 64-channel 3x3 convolution on ``(1, 64, height/4, width/4)`` (at least 8x8) and its
    FLOPs (2 per multiply-accumulate)."""
    h, w = max(8, height // 4), max(8, width // 4)
    conv = nn.Conv2d(CONV_CHANNELS, CONV_CHANNELS, 3, padding=1).eval()
    return partial(conv, torch.rand(1, CONV_CHANNELS, h, w)), 2 * CONV_CHANNELS ** 2 * 9 * h * w


@torch.inference_mode()
def camera_speed(vae: VAEBase, runners: dict[str, Callable[[Tensor], Tensor]],
                 sizes: tuple[tuple[int, int], ...] = CAMERA_SIZES, repeats: int = 10,
                 warmup: int = 1) -> dict[str, dict[str, dict[str, float]]]:
    """``{"HxW": {name: {"median_ms", "p90_ms", "fps", "gflops", "fraction_of_conv"}}}`` of each
    runner (``(1, C, H, W)`` -> reconstruction with ``vae``'s weights), timed in the same rounds
    as :func:`conv_reference` (``"conv3x3_64"``: ``median_ms`` and ``gflops``)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for height, width in sizes:
        x = torch.rand(1, vae.in_channels, height, width)
        conv, conv_flops = conv_reference(height, width)
        times = timings({**{k: partial(fn, x) for k, fn in runners.items()}, "conv3x3_64": conv},
                        repeats, warmup, desc=f"camera {height}x{width}")
        conv_ms = times.pop("conv3x3_64")["median_ms"]
        conv_gflops = conv_flops / conv_ms / 1e6
        flops = 2 * count_macs(vae, height, width, "both")
        row = {"conv3x3_64": {"median_ms": conv_ms, "gflops": conv_gflops}}
        for name, stats in times.items():
            gflops = flops / stats["median_ms"] / 1e6
            row[name] = {"median_ms": stats["median_ms"], "p90_ms": stats["p90_ms"],
                         "fps": stats["throughput_ips"], "gflops": gflops,
                         "fraction_of_conv": gflops / conv_gflops}
        out[f"{height}x{width}"] = row
    return out


def camera_lines(section: dict[str, dict[str, dict[str, float]]], threads: int) -> list[str]:
    """:func:`camera_speed`'s result as a Markdown table."""
    lines = [f"| frame | runtime ({threads} threads) | latency median | p90 | fps | GFLOP/s | "
             "of the 3x3 conv |", "|---|---|---|---|---|---|---|"]
    for size, row in section.items():
        lines += [f"| {size} | {name} | {r['median_ms']:.1f} ms | {r['p90_ms']:.1f} ms | "
                  f"{r['fps']:.2f} | {r['gflops']:.1f} | {100 * r['fraction_of_conv']:.0f}% |"
                  for name, r in row.items() if name != "conv3x3_64"]
        conv = row["conv3x3_64"]
        lines.append(f"| {size} | 64-channel 3x3 conv, reference | {conv['median_ms']:.2f} ms | "
                     f"| | {conv['gflops']:.1f} | 100% |")
    return lines


def quantize_uint8(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Latents ``(B, C, h, w)`` as uint8 ``(q, low, scale)``, one min/max scale per image
    (``(B, 1, 1, 1)``); :func:`dequantize_uint8` inverts it up to ``scale / 2``."""
    flat = z.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1, 1)
    span = flat.max(1).values.view(-1, 1, 1, 1) - low
    scale = torch.where(span > 0, span / 255.0, torch.ones_like(span))
    return ((z - low) / scale).round().clamp(0, 255).to(torch.uint8), low, scale


def dequantize_uint8(q: Tensor, low: Tensor, scale: Tensor) -> Tensor:
    """Float latents back from :func:`quantize_uint8`'s ``(q, low, scale)``."""
    return q.float() * scale + low


@torch.inference_mode()
def measure_quality(teacher: VAEBase, student: VAEBase, adapter: nn.Module | None,
                    dataset: Any, num_images: int | None = None, batch_size: int = 128,
                    num_samples: int = 8) -> dict[str, Any]:
    """Both models on the first ``num_images`` (>= 2, else ``ValueError``) items of ``dataset``:
    ``{teacher,student,student_uint8}_{psnr_db,ssim}``, ``cka_unadapted``, ``cka_adapted`` and
    ``cross_psnr_db`` (``teacher.decode(adapter(student.encode(x)))``; None without an
    adapter), ``num_images`` and ``samples`` (the first images, for the figure)."""
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    if n < 2:
        raise ValueError(f"need at least 2 images to measure quality and CKA, got {n}")
    for m in (teacher, student, adapter):
        if m is not None:
            m.eval()
    parts: dict[str, list[Tensor]] = {}
    for i in range(0, n, batch_size):
        x = torch.stack([dataset[j] for j in range(i, min(i + batch_size, n))])
        zt, zs = teacher.encode(x), student.encode(x)
        got = {"inputs": x, "teacher": teacher.decode(zt), "student": student.decode(zs),
               "student_uint8": student.decode(dequantize_uint8(*quantize_uint8(zs))),
               "z_teacher": zt, "z_student": zs}
        if adapter is not None:
            got["z_adapted"] = adapter(zs)
            got["cross"] = teacher.decode(got["z_adapted"])
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
    out = {k: torch.cat(v) for k, v in parts.items()}
    x = out["inputs"]
    result: dict[str, Any] = {"num_images": n}
    for name in ("teacher", "student", "student_uint8"):
        result[f"{name}_psnr_db"], result[f"{name}_ssim"] = psnr(out[name], x), ssim(out[name], x)
    return {**result, "cka_unadapted": linear_cka(out["z_student"], out["z_teacher"]),
            "cka_adapted": linear_cka(out["z_adapted"], out["z_teacher"]) if adapter else None,
            "cross_psnr_db": psnr(out["cross"], x) if adapter else None,
            "samples": {k: out[k][:num_samples] for k in ("inputs", "teacher", "student")}}


def held_out_frames(photos: Sequence[str] | None = None) -> list[Tensor]:
    """The held-out ``photos`` (default :data:`~hrm_vision.data.VAL_PHOTOS`) at full resolution,
    centre-cropped to sides divisible by 8: ``(1, 3, H, W)`` tensors in [0, 1]."""
    from .data import VAL_PHOTOS, load_photo

    frames = []
    for name in VAL_PHOTOS if photos is None else photos:
        img = torch.from_numpy(load_photo(name)).permute(2, 0, 1).float().div_(255.0)
        h, w = (s - s % 8 for s in img.shape[-2:])
        top, left = (img.shape[-2] - h) // 2, (img.shape[-1] - w) // 2
        frames.append(img[None, :, top:top + h, left:left + w].contiguous())
    return frames


def frames_psnr(reconstruct: Callable[[Tensor], Tensor], images: Sequence[Tensor]) -> float:
    """PSNR of ``reconstruct(x)`` (clamped to [0, 1]) pooled over every pixel of ``images``."""
    se, n = 0.0, 0
    with torch.inference_mode():
        for x in images:
            se += F.mse_loss(reconstruct(x).double().clamp(0, 1), x.double(),
                             reduction="sum").item()
            n += x.numel()
    return psnr_from_mse(se / n) if n else math.nan


@dataclass(frozen=True)
class RateQuality:
    """A model's mean KL to N(0, I) per latent element (and in bits per pixel), decode(mu) and
    decode(z) PSNR, and the Gaussian references at that rate from the images' patch spectrum."""

    model: str
    images: str
    latent_channels: int
    kl_nats_per_element: float
    bits_per_pixel: float
    psnr_mu_db: float
    psnr_sample_db: float
    water_filling_psnr_db: float
    uniform_psnr_db: float


@torch.inference_mode()
def measure_rate(model: VAEBase, name: str, images: Tensor | Sequence[Tensor], label: str,
                 spectrum: Tensor, seed: int = 0, batch_size: int = 128) -> RateQuality:
    """:class:`RateQuality` of ``model`` on ``images``, ``(N, 3, H, W)`` or a list of
    ``(1, 3, H, W)`` frames; ``spectrum``: :func:`patch_spectrum` of them."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    se_mu = se_z = kl = 0.0
    pixels = elements = 0
    for x in images.split(batch_size) if isinstance(images, Tensor) else images:
        mu, logvar = model.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen).to(mu)
        se_mu += F.mse_loss(model.decode(mu).double(), x.double(), reduction="sum").item()
        se_z += F.mse_loss(model.decode(z).double(), x.double(), reduction="sum").item()
        kl += float(gaussian_kl(mu, logvar).double().sum())
        pixels, elements = pixels + x.numel(), elements + mu.numel()
    # latent elements per 8x8 patch (a vector latent's numbers spread over the image's cells)
    nats, c = kl / elements, elements / (pixels / (3 * patches.PIXELS_PER_CELL))
    return RateQuality(
        model=name, images=label, latent_channels=round(c), kl_nats_per_element=nats,
        bits_per_pixel=patches.bits_per_pixel(nats, c),
        psnr_mu_db=psnr_from_mse(se_mu / pixels), psnr_sample_db=psnr_from_mse(se_z / pixels),
        water_filling_psnr_db=psnr_from_mse(patches.water_filling(spectrum, nats * c)),
        uniform_psnr_db=psnr_from_mse(patches.uniform_allocation(spectrum, nats,
                                                             min(round(c), spectrum.numel()))))


@dataclass(frozen=True)
class Baseline:
    """A reference reconstruction: numbers kept per image (per 8x8 patch on frames), PSNR."""

    name: str
    numbers: int
    psnr_db: float


def thumbnail(images: Tensor, side: int) -> Tensor:
    """``images`` area-downsampled to ``side x side``, bicubic back up, clamped to [0, 1]."""
    small = F.interpolate(images, size=(side, side), mode="area")
    return F.interpolate(small, size=images.shape[-2:], mode="bicubic",
                         align_corners=False).clamp(0, 1)


class PatchPCA:
    """Patch PCA fitted on training images: :meth:`reconstruct` keeps the first ``k``
    coefficients of every 8x8x3 patch (``ValueError`` beyond the component count)."""

    def __init__(self, train_images: Tensor, patch: int = PATCH) -> None:
        self.patch = patch
        self.mean, self.components, self.variances = fit_patch_pca(train_images, patch)

    def reconstruct(self, images: Tensor, k: int) -> Tensor:
        if not 0 <= k <= self.components.shape[0]:
            raise ValueError(f"k must be in [0, {self.components.shape[0]}], got {k}")
        n, _, h, w = images.shape
        rows = patch_vectors(images.float(), self.patch) - self.mean
        basis = self.components[:k]
        rec = (rows @ basis.T) @ basis + self.mean
        cols = rec.reshape(n, h // self.patch, w // self.patch, -1).permute(0, 3, 1, 2)
        return F.pixel_shuffle(cols, self.patch).clamp(0, 1)


def compute_baselines(val_images: Tensor, pca: PatchPCA, sides: Sequence[int] = THUMBNAIL_SIDES,
                      coefficients: Sequence[int] = PCA_COEFFICIENTS) -> list[Baseline]:
    """Thumbnails and ``pca`` (fitted on training images) on ``val_images`` ``(N, 3, H, W)``."""
    cells = (val_images.shape[-2] // PATCH) * (val_images.shape[-1] // PATCH)
    return [Baseline(f"thumbnail {s}x{s}, bicubic", 3 * s * s,
                     psnr(thumbnail(val_images, s), val_images)) for s in sides] + \
        [Baseline(f"patch PCA, {k} coefficients", k * cells,
                  psnr(pca.reconstruct(val_images, k), val_images)) for k in coefficients]


def patch_spectrum(images: Tensor | Sequence[Tensor], patch: int = PATCH) -> Tensor:
    """Decreasing variances ``(3 * patch**2,)`` of the patches' principal components; ``images``:
    a tensor or a list of frames of different sizes."""
    if not isinstance(images, Tensor):
        images = torch.cat([patch_vectors(x, patch).reshape(-1, x.shape[1], patch, patch)
                            for x in images])
    return fit_patch_pca(images, patch)[2]


def crop_baselines(val_images: Tensor, train_images: Tensor,
                   coefficients: Sequence[int] = CROP_PCA_COEFFICIENTS,
                   sides: Sequence[int] = CROP_THUMBNAIL_SIDES) -> list[Baseline]:
    """Crop PCA (fitted on the first :data:`CROP_PCA_FIT` of ``train_images``) and thumbnails
    on ``val_images`` ``(N, C, S, S)``, sorted by numbers kept."""
    from .compact import fit_crop_pca

    rows = []
    if coefficients:
        mean, comps, _ = fit_crop_pca(train_images[:CROP_PCA_FIT], max(coefficients))
        flat = val_images.flatten(1).float() - mean
        for k in coefficients:
            rec = (mean + (flat @ comps[:k].T) @ comps[:k]).reshape(val_images.shape)
            rows.append(Baseline(f"crop PCA, {k} coefficients", k, psnr(rec, val_images)))
    rows += [Baseline(f"thumbnail {s}x{s}, bicubic", val_images.shape[1] * s * s,
                      psnr(thumbnail(val_images, s), val_images)) for s in sides]
    return sorted(rows, key=lambda b: b.numbers)


def metrics(throughput_batch: int) -> list[tuple[str, str, bool, str]]:
    """The table's rows, in order: (JSON key, label, higher is better, format)."""
    rows = [("parameters", "parameters", False, "{:,.0f}"),
            ("weights_fp32_bytes", "weights file, fp32 state dict", False, "{:.2f} MB"),
            ("weights_fp16_bytes", "weights file, fp16 state dict", False, "{:.2f} MB")]
    rows += [(f"macs_{op}", f"MACs per image, {op}", False, "{:.1f} M") for op in OPS]
    rows += [(f"latency_{op}_{s}_ms", f"CPU latency batch 1, {op}, {s}", False, "{:.2f} ms")
             for op in OPS for s in ("median", "p90")]
    rows += [(f"throughput_{op}_ips", f"CPU throughput batch {throughput_batch}, {op}", True,
              "{:,.0f} img/s") for op in OPS]
    return rows + [("psnr_db", "PSNR (dB)", True, "{:.2f}"), ("ssim", "SSIM", True, "{:.4f}")]


def _fmt(value: float, fmt: str) -> str:
    return fmt.format(value / 1e6 if " M" in fmt else value)  # MB and M: in millions


def ratios(teacher: dict[str, float], student: dict[str, float],
           rows: list[tuple[str, str, bool, str]]) -> dict[str, float]:
    """Student advantage per metric: student/teacher if higher is better, else teacher/student."""
    return {key: student[key] / teacher[key] if higher else teacher[key] / student[key]
            for key, _, higher, _ in rows}


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: metric table, latent section, baselines, rate, provenance."""
    t, s, r = report["teacher"], report["student"], report["ratios"]
    lines = ["| metric | teacher | student | ratio (student advantage) |", "|---|---|---|---|"]
    lines += [f"| {label} | {_fmt(t[key], fmt)} | {_fmt(s[key], fmt)} | {r[key]:.2f}x |"
              for key, label, _, fmt in metrics(report["timing"]["throughput_batch"])]
    align, q = report["alignment"], report["latent_uint8"]
    cka, cross = align["cka_adapted"], align["cross_psnr_db"]
    lines += ["", "| latent | value |", "|---|---|",
              "| linear CKA, adapted student vs teacher | "
              f"{'n/a (no adapter)' if cka is None else f'{cka:.4f}'} |",
              f"| linear CKA, raw student vs teacher | {align['cka_unadapted']:.4f} |",
              "| teacher decoder on the adapted student latent | "
              f"{'n/a (no adapter)' if cross is None else f'{cross:.2f} dB PSNR'} |",
              f"| student PSNR, float32 latent | {q['psnr_float_db']:.2f} dB |",
              f"| student PSNR, uint8 latent | {q['psnr_uint8_db']:.2f} dB "
              f"(cost {q['psnr_cost_db']:.2g} dB) |",
              f"| student SSIM, uint8 latent | {q['ssim_uint8']:.4f} |",
              f"| latent bytes per image, float32 / uint8 | "
              f"{q['bytes_float32']:,} / {q['bytes_uint8']:,} |", "",
              f"uint8 scheme: {q['scheme']}."]
    lines += _reconstruction_lines(report["reconstructions"], "reconstruction (same images)",
                                   "numbers kept per image")
    lines += _rate_lines(report["rate"])
    if report.get("frames"):
        frames = report["frames"]
        sizes = ", ".join(f"{p['name']} {p['height']}x{p['width']}" for p in frames["photos"])
        lines += ["", f"Held-out photographs at full resolution ({sizes}), PSNR pooled over "
                  "every pixel:"]
        lines += _reconstruction_lines(frames["reconstructions"], "reconstruction (full frames)",
                                       "numbers per 8x8 patch")
        lines += _rate_lines(frames["rate"])
    if "camera" in report:
        lines += ["", *camera_lines(report["camera"], report["timing"]["threads"])]
    d, tm, mach = report["dataset"], report["timing"], report["machine"]
    lines += ["", "Ratios: teacher/student for costs, student/teacher for throughput and "
              "quality; above 1 means the student does better.",
              f"Quality on {d['num_images']} images of `{d['name']}` ({d['split']} split, "
              f"{d['image_size']}x{d['image_size']}). Timing: {tm['threads']} threads, "
              f"{tm['latency_repeats']} rounds at batch 1, {tm['throughput_repeats']} at batch "
              f"{tm['throughput_batch']}, both models interleaved in one process, medians.",
              f"Machine: {mach['cpu']} ({mach['cpu_count']} logical CPUs, load average "
              f"{mach.get('load_average_1_5_15min')} at the start), torch {mach['torch']}, "
              f"{report['date_utc']}.", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def _reconstruction_lines(rows: list[dict[str, Any]], title: str, numbers: str) -> list[str]:
    return ["", f"| {title} | {numbers} | PSNR (dB) |", "|---|---|---|",
            *(f"| {r['name']} | {r['numbers']:,} | {r['psnr_db']:.2f} |" for r in rows)]


def _rate_lines(rows: list[dict[str, Any]]) -> list[str]:
    return ["", "| rate (same images) | images | KL nats per latent element | bits per pixel | "
            "decode(mu) PSNR | decode(z) PSNR | water-filling bound at that rate | "
            "uniform allocation at that rate |", "|---|---|---|---|---|---|---|---|",
            *(f"| {r['model']} | {r['images']} | {r['kl_nats_per_element']:.3f} | "
              f"{r['bits_per_pixel']:.2f} | {r['psnr_mu_db']:.2f} dB | "
              f"{r['psnr_sample_db']:.2f} dB | {r['water_filling_psnr_db']:.2f} dB | "
              f"{r['uniform_psnr_db']:.2f} dB |" for r in rows)]


def figure_rows(samples: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    """``(label, images (K, 3, S, S) in [0, 1])`` rows of the figure: the inputs, teacher and
    student in ``samples``, and the student's error enlarged ten times."""
    rows = [(n, samples[n]) for n in ("inputs", "teacher", "student") if n in samples]
    if "inputs" in samples and "student" in samples:
        rows.append(("error x10", error_image(samples["student"], samples["inputs"])))
    return rows


def figure(report: dict[str, Any], samples: dict[str, Tensor], path: Path) -> Path:
    """:func:`figure_rows` above a bar chart of the ratios, as a PNG at ``path``."""
    from matplotlib.figure import Figure

    rows = figure_rows(samples)
    k = rows[0][1].shape[0] if rows else 0
    fig = Figure(figsize=(max(8.0, 1.1 * k), 3.3 + 1.1 * len(rows)), layout="constrained")
    grid = fig.add_gridspec(len(rows) + 1, max(k, 1), height_ratios=[1.0] * len(rows) + [3.0])
    for row, (name, images) in enumerate(rows):
        for col in range(k):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(images[col].clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set(xticks=[], yticks=[], ylabel=name if col == 0 else "")
    r = report["ratios"]
    bars = {"parameters (T/S)": r["parameters"], "fp32 file (T/S)": r["weights_fp32_bytes"],
            "MACs enc+dec (T/S)": r["macs_both"],
            **{f"throughput {op} (S/T)": r[f"throughput_{op}_ips"] for op in OPS},
            "PSNR (S/T)": r["psnr_db"], "SSIM (S/T)": r["ssim"]}
    if report["alignment"]["cka_adapted"] is not None:
        bars["CKA adapted (value)"] = report["alignment"]["cka_adapted"]
    ax = fig.add_subplot(grid[len(rows), :])
    ax.barh(list(bars), list(bars.values()),
            color=["tab:blue"] * 6 + ["tab:green"] * (len(bars) - 6))
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, v in enumerate(bars.values()):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set(xscale="log", xlabel="ratio (log scale); above 1: the student does better",
           title="student vs teacher")
    fig.savefig(path, dpi=110)
    return path


def rate_rows(args: argparse.Namespace, models: dict[str, VAEBase], images: Any, label: str
              ) -> list[dict[str, Any]]:
    """:func:`measure_rate` of every model on ``images``."""
    spectrum = patch_spectrum(images)
    return [asdict(measure_rate(m, name, images, label, spectrum, args.seed, args.batch_size))
            for name, m in models.items()]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The report ``args`` ask for (``evaluation.json``'s dict, plus the figure's ``samples``)."""
    ckpt = Path(args.checkpoint_dir)
    teacher_path = Path(args.teacher) if args.teacher else ckpt / "teacher.pth"
    student_path = Path(args.student) if args.student else ckpt / "tinyvae_best.pth"
    teacher = model_from_payload(load_checkpoint(teacher_path), "teacher", str(teacher_path))
    payload = load_checkpoint(student_path)
    student = model_from_payload(payload, "student", str(student_path))
    adapter = adapter_from_payload(payload, str(student_path))
    size = args.image_size
    dataset = build_dataset(args.dataset, "val", image_size=size, data_dir=args.data_dir)
    quality = measure_quality(teacher, student, adapter, dataset, args.num_images,
                              args.batch_size)
    n = quality["num_images"]
    models = {"teacher": teacher, "student": student}
    result = {k: footprint(m, size) for k, m in models.items()}
    batch = torch.stack([dataset[i % n] for i in range(args.throughput_batch)])
    for name, speed in measure_speed(models, batch, args.latency_repeats,
                                     args.throughput_repeats, args.warmup).items():
        result[name].update(speed, psnr_db=quality[f"{name}_psnr_db"],
                            ssim=quality[f"{name}_ssim"])
    val = validation_images(args.dataset, n, size, args.data_dir)
    pca = (PatchPCA(validation_images(args.dataset, args.baseline_train_images, size,
                                      args.data_dir, split="train"))
           if args.baseline_train_images > 0 else None)
    crops = [{"name": name, "numbers": math.prod(m.latent_shape(size, size)),
              "psnr_db": quality[f"{name}_psnr_db"]} for name, m in models.items()]
    latent = math.prod(student.latent_shape(size, size))  # (C, h, w), or (C,) for a vector
    float_db, uint8_db = quality["student_psnr_db"], quality["student_uint8_psnr_db"]
    report = {
        "command": args.command,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "checkpoints": {"teacher": str(teacher_path), "student": str(student_path)},
        "dataset": {"name": args.dataset, "split": "val", "num_images": n, "image_size": size},
        "timing": {"threads": torch.get_num_threads(), "latency_repeats": args.latency_repeats,
                   "throughput_repeats": args.throughput_repeats,
                   "throughput_batch": args.throughput_batch, "warmup": args.warmup},
        **result,
        "ratios": ratios(result["teacher"], result["student"], metrics(args.throughput_batch)),
        "alignment": {k: quality[k] for k in ("cka_adapted", "cka_unadapted", "cross_psnr_db")},
        "latent_uint8": {"scheme": UINT8_SCHEME, "psnr_float_db": float_db,
                         "psnr_uint8_db": uint8_db, "psnr_cost_db": float_db - uint8_db,
                         "ssim_uint8": quality["student_uint8_ssim"],
                         "bytes_float32": 4 * latent, "bytes_uint8": latent + 8},
        "reconstructions": crops + ([asdict(b) for b in compute_baselines(val, pca)]
                                    if pca else []),
        "rate": rate_rows(args, models, val, f"{size}x{size} crops"),
        "frames": None,
    }
    if not args.no_frames and args.dataset == "photos":
        from .data import VAL_PHOTOS

        frames = held_out_frames()
        rows = [{"name": name, "numbers": m.latent_dim,
                 "psnr_db": frames_psnr(lambda x, m=m: m.decode(m.encode(x)), frames)}
                for name, m in models.items()]
        rows += [{"name": f"patch PCA, {k} coefficients", "numbers": k,
                  "psnr_db": frames_psnr(partial(pca.reconstruct, k=k), frames)}
                 for k in PCA_COEFFICIENTS] if pca else []
        report["frames"] = {"photos": [{"name": name, "height": x.shape[-2], "width": x.shape[-1]}
                                       for name, x in zip(VAL_PHOTOS, frames, strict=True)],
                            "reconstructions": rows,
                            "rate": rate_rows(args, models, frames, "frames")}
    if args.camera_repeats:  # the student at camera resolution, eager, two memory layouts
        from .export import chain, eager_runner

        runners = {"eager (default)": lambda x: student.decode(student.encode(x)),
                   "eager (channels_last)": chain(eager_runner(student, "encode"),
                                                  eager_runner(student, "decode"))}
        report["camera"] = camera_speed(student, runners, CAMERA_SIZES, args.camera_repeats)
    return {**report, "samples": quality["samples"]}


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``evaluation.json`` (non-finite values as null), ``.md`` and ``.png`` in ``out_dir``."""
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


#: The command's integer options: flag, default, smallest value allowed, help.
INT_OPTIONS = (
    ("--image-size", 32, 8, "image side"),
    ("--num-images", 1024, 2, "validation images for quality and CKA"),
    ("--batch-size", 128, 1, "batch of the quality pass"),
    ("--threads", 1, 1, "torch CPU threads"),
    ("--latency-repeats", 50, 1, "timed rounds at batch 1"),
    ("--warmup", 2, 0, "untimed rounds first"),
    ("--throughput-repeats", 10, 1, "timed rounds at the throughput batch"),
    ("--throughput-batch", 64, 1, "batch of the throughput measurement"),
    ("--baseline-train-images", 4096, 0, "training images of the patch-PCA baseline; 0: none"),
    ("--camera-repeats", 3, 0, "rounds of the student's 64x64 and 480x640 timing; 0 skips it"),
)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Teacher vs student: size, speed, quality.")
    add = p.add_argument
    add("--checkpoint-dir", default="checkpoints",
        help="folder with teacher.pth and tinyvae_best.pth (default %(default)s)")
    add("--teacher", help="teacher checkpoint (default <checkpoint-dir>/teacher.pth)")
    add("--student", help="student checkpoint (default <checkpoint-dir>/tinyvae_best.pth)")
    add("--out-dir", help="output folder (default <checkpoint-dir>/evaluation)")
    add("--dataset", default="photos", help="dataset name (default %(default)s)")
    add("--data-dir", default="./data", help="dataset root, if it needs one")
    for flag, default, _, text in INT_OPTIONS:
        add(flag, type=int, default=default, help=f"{text} (default {default})")
    add("--no-frames", action="store_true", help="leave out the full-resolution photographs")
    add("--seed", type=int, default=0, help="seed of the posterior samples decode(z) decodes")
    return p


def command(argv: list[str] | None = None, prog: str = "hrm-vision evaluate") -> int:
    """Evaluate, write and print the report; returns 0. A bad option exits with 2; a bad
    checkpoint, dataset or unwritable file raises ``ValueError`` or ``OSError``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog)
    args = parser.parse_args(argv)
    bad = [f"{flag} must be >= {low}" for flag, _, low, _ in INT_OPTIONS
           if getattr(args, flag[2:].replace("-", "_")) < low]
    if bad:
        parser.error(", ".join(bad))
    torch.set_num_threads(args.threads)
    args.command = shlex.join([*prog.split(), *argv])
    paths = write_report(evaluate(args), Path(args.out_dir or Path(args.checkpoint_dir)
                                              / "evaluation"))
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0

