"""Reconstruction quality, latent alignment, the cost of a uint8 latent, and rate, on a dataset
split and on the held-out photographs at full resolution."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .. import rate
from ..metrics import linear_cka, psnr, psnr_from_mse, ssim
from ..train.loss import gaussian_kl
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


def held_out_frames(photos: Sequence[str] | None = None) -> list[Tensor]:
    """The held-out photographs of the ``photos`` dataset at full resolution, each centre-cropped
    to sides divisible by 8: a list of ``(1, 3, H, W)`` float tensors in [0, 1] (sizes differ).

    ``photos`` defaults to :data:`hrm_vision.data.photos.VAL_PHOTOS`. Needs the ``photos`` extra.
    """
    from ..data.photos import VAL_PHOTOS, load_photo

    frames = []
    for name in VAL_PHOTOS if photos is None else photos:
        img = torch.from_numpy(load_photo(name)).permute(2, 0, 1).float().div_(255.0)
        h, w = (s - s % 8 for s in img.shape[-2:])
        top, left = (img.shape[-2] - h) // 2, (img.shape[-1] - w) // 2
        frames.append(img[None, :, top:top + h, left:left + w].contiguous())
    return frames


def batches(images: Tensor | Sequence[Tensor], batch_size: int) -> list[Tensor]:
    """``images`` as a list of ``(B, 3, H, W)`` batches: a tensor is cut into batches of
    ``batch_size``; a list of tensors (images of different sizes) is kept as it is."""
    if isinstance(images, Tensor):
        return list(images.split(batch_size))
    return list(images)


@dataclass(frozen=True)
class RateQuality:
    """What a model's rate buys, on one set of images (PSNR pooled over the set, in dB).

    ``kl_nats_per_element``: mean KL of the posterior to N(0, I) per latent element;
    ``bits_per_pixel``: the same rate per pixel (:func:`hrm_vision.rate.bits_per_pixel`);
    ``psnr_mu_db``: decode(mu); ``psnr_sample_db``: decode(z), z a posterior sample (seeded);
    ``water_filling_psnr_db`` and ``uniform_psnr_db``: the Gaussian references at the same rate
    from the spectrum of the set's 8x8x3 patches (:func:`hrm_vision.rate.water_filling`,
    :func:`hrm_vision.rate.uniform_allocation` over the model's latent channels).
    """

    model: str
    images: str
    latent_channels: int
    kl_nats_per_element: float
    bits_per_pixel: float
    psnr_mu_db: float
    psnr_sample_db: float
    water_filling_psnr_db: float
    uniform_psnr_db: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.inference_mode()
def measure_rate(model: VAEBase, name: str, images: Tensor | Sequence[Tensor], label: str,
                 spectrum: Tensor, seed: int = 0, batch_size: int = 128) -> RateQuality:
    """Rate and both qualities of ``model`` (eval mode) on ``images``: a tensor
    ``(N, 3, H, W)`` or a list of ``(1, 3, H, W)`` frames, in [0, 1]. The posterior samples use
    a generator seeded with ``seed``; ``spectrum`` is the patch spectrum of the same images
    (:func:`hrm_vision.evaluation.baselines.patch_spectrum`)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    se_mu = se_z = kl = 0.0
    pixels = elements = 0
    for x in batches(images, batch_size):
        mu, logvar = model.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen).to(mu)
        se_mu += F.mse_loss(model.decode(mu).double(), x.double(), reduction="sum").item()
        se_z += F.mse_loss(model.decode(z).double(), x.double(), reduction="sum").item()
        kl += float(gaussian_kl(mu, logvar).double().sum())
        pixels, elements = pixels + x.numel(), elements + mu.numel()
    # latent elements per 8x8 patch: the channels of a spatial latent, and the same count for
    # a vector latent (its numbers over the image's 8x8 cells)
    nats, c = kl / elements, elements / (pixels / (3 * rate.PIXELS_PER_CELL))
    return RateQuality(
        model=name, images=label, latent_channels=round(c), kl_nats_per_element=nats,
        bits_per_pixel=rate.bits_per_pixel(nats, c),
        psnr_mu_db=psnr_from_mse(se_mu / pixels), psnr_sample_db=psnr_from_mse(se_z / pixels),
        water_filling_psnr_db=rate.psnr_db(rate.water_filling(spectrum,
                                                              rate.patch_rate_nats(nats, c))),
        uniform_psnr_db=rate.psnr_db(rate.uniform_allocation(spectrum, nats,
                                                             min(round(c), spectrum.numel()))))


def pooled_psnr(reconstruct: Callable[[Tensor], Tensor], images: Sequence[Tensor]) -> float:
    """PSNR pooled over every pixel of ``images`` (tensors of any sizes) of ``reconstruct(x)``."""
    se, n = 0.0, 0
    with torch.inference_mode():
        for x in images:
            se += F.mse_loss(reconstruct(x).double().clamp(0, 1), x.double(),
                             reduction="sum").item()
            n += x.numel()
    return psnr_from_mse(se / n) if n else math.nan
