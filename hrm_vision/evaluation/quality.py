"""Reconstruction quality, latent alignment and the cost of a uint8 latent, on a dataset split."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data import build_dataset
from ..metrics import linear_cka, psnr, ssim
from ..vae import VAEBase

#: How the student latent is stored as uint8 (see :func:`quantize_uint8`).
UINT8_SCHEME = ("per image, per tensor min/max affine: q = round((z - min) / s), "
                "s = (max - min) / 255; min and s travel as two float32 per image")


def quantize_uint8(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise latents ``(B, C, h, w)`` to uint8 with one min/max scale per image.

    Returns ``(q, low, scale)``: ``q`` uint8 ``(B, C, h, w)``, ``low`` and ``scale`` float
    ``(B, 1, 1, 1)``; :func:`dequantize_uint8` inverts it up to ``scale / 2`` per element. A
    4x4x128 latent then travels as 2048 bytes + 8 bytes instead of 8192 bytes in float32.
    """
    if z.dim() != 4 or not z.is_floating_point():
        raise ValueError(f"expected float latents (B, C, h, w), got {z.dtype} {tuple(z.shape)}")
    flat = z.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1, 1)
    span = flat.max(1).values.view(-1, 1, 1, 1) - low
    scale = torch.where(span > 0, span / 255.0, torch.ones_like(span))
    q = ((z - low) / scale).round().clamp(0, 255).to(torch.uint8)
    return q, low, scale


def dequantize_uint8(q: Tensor, low: Tensor, scale: Tensor) -> Tensor:
    """Float latents back from :func:`quantize_uint8`'s ``(q, low, scale)``."""
    return q.float() * scale + low


@dataclass
class QualityResult:
    """Quality of both models on ``num_images`` images (PSNR in dB, SSIM and CKA in [0, 1]).

    ``cka_adapted`` compares ``adapter(student latent)`` with the teacher latent (None without
    an adapter); ``cka_unadapted`` the raw student latent. ``cross_psnr_db`` is the teacher's
    decoder reading the adapted student latent, ``teacher.decode(adapter(student.encode(x)))``
    (None without an adapter). ``student_uint8_*`` decode the
    student latent after a uint8 round trip. ``samples`` holds the first images, (K, 3, S, S):
    ``inputs``, ``teacher``, ``student`` (for the figure, not for the JSON).
    """

    num_images: int
    teacher_psnr_db: float
    teacher_ssim: float
    student_psnr_db: float
    student_ssim: float
    student_uint8_psnr_db: float
    student_uint8_ssim: float
    cka_unadapted: float
    cka_adapted: float | None
    cross_psnr_db: float | None = None
    samples: dict[str, Tensor] = field(repr=False, default_factory=dict)


@torch.inference_mode()
def measure_quality(teacher: VAEBase, student: VAEBase, adapter: nn.Module | None,
                    dataset: Dataset, num_images: int | None = None, batch_size: int = 128,
                    num_samples: int = 8) -> QualityResult:
    """Reconstruct the first ``num_images`` items of ``dataset`` with both models (eval mode).

    PSNR is pooled over all images (one MSE, :func:`hrm_vision.metrics.psnr`), SSIM is the mean
    over images, CKA uses the flattened latents of all images (N >= 2 needed).
    """
    total = len(dataset)  # type: ignore[arg-type]
    n = total if num_images is None else min(num_images, total)
    if n < 2:
        raise ValueError(f"need at least 2 images to measure quality and CKA, got {n}")
    teacher.eval()
    student.eval()
    if adapter is not None:
        adapter.eval()
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    parts: dict[str, list[Tensor]] = {k: [] for k in (
        "inputs", "teacher", "student", "student_uint8", "z_teacher", "z_student", "z_adapted",
        "cross")}
    for x in tqdm(loader, desc="quality", leave=False):
        zt, zs = teacher.encode(x), student.encode(x)
        parts["inputs"].append(x)
        parts["teacher"].append(teacher.decode(zt))
        parts["student"].append(student.decode(zs))
        parts["student_uint8"].append(student.decode(dequantize_uint8(*quantize_uint8(zs))))
        parts["z_teacher"].append(zt)
        parts["z_student"].append(zs)
        if adapter is not None:
            parts["z_adapted"].append(adapter(zs))
            parts["cross"].append(teacher.decode(parts["z_adapted"][-1]))
    out = {k: torch.cat(v) for k, v in parts.items() if v}
    x = out["inputs"]
    return QualityResult(
        num_images=n,
        teacher_psnr_db=psnr(out["teacher"], x),
        teacher_ssim=ssim(out["teacher"], x),
        student_psnr_db=psnr(out["student"], x),
        student_ssim=ssim(out["student"], x),
        student_uint8_psnr_db=psnr(out["student_uint8"], x),
        student_uint8_ssim=ssim(out["student_uint8"], x),
        cka_unadapted=linear_cka(out["z_student"], out["z_teacher"]),
        cka_adapted=(linear_cka(out["z_adapted"], out["z_teacher"])
                     if "z_adapted" in out else None),
        cross_psnr_db=psnr(out["cross"], x) if "cross" in out else None,
        samples={k: out[k][:num_samples] for k in ("inputs", "teacher", "student")},
    )


def validation_images(dataset: str, num_images: int, image_size: int,
                      data_dir: str = "./data", split: str = "val") -> Tensor:
    """The first ``num_images`` images of ``dataset``'s ``split`` (validation by default),
    (N, 3, S, S) in [0, 1]."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    ds = build_dataset(dataset, split, image_size=image_size, data_dir=data_dir)
    n = min(num_images, len(ds))  # type: ignore[arg-type]
    return torch.stack([_image(ds[i]) for i in range(n)])


def _image(item: Tensor | tuple[Tensor, ...]) -> Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item
