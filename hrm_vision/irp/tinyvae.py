"""The ``tinyvae`` perception plugin, which refines the TinyVAE student's latent (docs/irp.md,
its energy and step), and the package's one image converter, :func:`to_images`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from ..codes import Codes, from_8bit_binned, from_tokens, to_8bit_binned, to_tokens
from ..compact import CompactStudentVAE
from ..io import CheckpointError, load
from ..vae import MinimalVAE
from .contract import IRPConfig, IRPPlugin, IRPState, hookimpl

ChannelOrder = Literal["rgb", "bgr"]
STEP_GROWTH = 1.5  # of an accepted step size, for the next update
RANGE_TOLERANCE = 1e-3  # float pixels may exceed value_range by this share of its width


@dataclass(frozen=True)
class ImageFormat:
    """A caller's images: float pixels in ``value_range`` (uint8: 0-255); ``channel_order``
    ``None``: tensors RGB, 3-channel numpy refused; ``channels`` 1: grey; ``size``: the model's
    square side (``None``: the image's own, a multiple of ``multiple_of``); ``resize`` or refuse."""

    value_range: tuple[float, float] = (0.0, 1.0)
    channel_order: ChannelOrder | None = "rgb"
    channels: int = 3
    model_channels: int = 3
    size: int | None = None
    multiple_of: int = 8
    resize: bool = False


def to_images(x: Any, fmt: ImageFormat, device: torch.device | str = "cpu") -> Tensor:
    """``x`` (NCHW/CHW tensor, NHWC/HWC array; grey also HW) as a new float tensor
    ``(B, model_channels, H, W)`` in [0, 1], RGB, on ``device``."""
    c, numpy_input = fmt.channels, isinstance(x, np.ndarray)
    if numpy_input:
        x = x[:, :, None] if x.ndim == 2 and c == 1 else x
        if x.ndim not in (3, 4) or x.shape[-1] != c:
            raise ValueError(f"numpy images are channels-last as OpenCV gives them, (H, W, {c}) "
                             f"or (B, H, W, {c}) (input_channels={c}), got {x.shape}")
        batch = torch.from_numpy(np.array(x[None] if x.ndim == 3 else x, copy=True))
        batch = batch.permute(0, 3, 1, 2)
    elif isinstance(x, Tensor):
        x = x[None] if x.dim() == 2 and c == 1 else x
        if x.dim() not in (3, 4) or x.shape[-3] != c:
            raise ValueError(f"torch images are channels-first, ({c}, H, W) or (B, {c}, H, W) "
                             f"(input_channels={c}), got {tuple(x.shape)}; channels-last input "
                             "needs x.permute(0, 3, 1, 2)")
        batch = (x[None] if x.dim() == 3 else x).detach().clone()
    else:
        raise ValueError(f"expected a torch tensor or a numpy array, got {type(x).__name__}")
    b, _, h, w = batch.shape
    if b == 0:
        raise ValueError(f"no image in the input (an empty batch, no pixels: shape "
                         f"{tuple(x.shape)})")
    if h == 0 or w == 0:
        raise ValueError(f"the image has no pixels ({h}x{w}, shape {tuple(x.shape)})")
    images = _scaled(batch, fmt.value_range)
    if c == 3 and fmt.channel_order is None and numpy_input:
        raise ValueError("a 3-channel numpy image needs channel_order='bgr' (OpenCV) or 'rgb'; "
                         "torch tensors are read as RGB")
    if c == 3 and fmt.channel_order == "bgr":
        images = images.flip(1)
    images = images.to(device)
    if c == 1 and fmt.model_channels == 3:
        images = images.expand(-1, 3, -1, -1)
    m = fmt.multiple_of
    size = (fmt.size, fmt.size) if fmt.size else tuple(max(m, round(s / m) * m) for s in (h, w))
    if (h, w) != size:
        if not fmt.resize:
            want = (f"the model's {fmt.size}x{fmt.size}" if fmt.size else
                    f"a multiple of {m} (the TinyVAE needs sides divisible by {m})")
            raise ValueError(f"image size {h}x{w} is not {want}; crop it or set resize=True")
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                               antialias=True).clamp_(0, 1)
    return images.contiguous()


def from_images(images: Tensor, fmt: ImageFormat) -> Tensor:
    """Model images ``(B, model_channels, H, W)`` in [0, 1] in the caller's convention:
    ``channels`` (grey: the mean of RGB), ``channel_order``, ``value_range``."""
    if fmt.channels == 1 and images.shape[1] == 3:
        images = images.mean(1, keepdim=True)
    elif fmt.channel_order == "bgr":
        images = images.flip(1)
    low, high = fmt.value_range
    return images * (high - low) + low


def _scaled(x: Tensor, value_range: tuple[float, float]) -> Tensor:
    """uint8 or float pixels in ``value_range`` -> float in [0, 1]."""
    low, high = value_range
    if x.dtype == torch.uint8:
        if (low, high) not in ((0.0, 1.0), (0.0, 255.0)):
            raise ValueError(f"uint8 images hold 0-255, which contradicts value_range "
                             f"{value_range}")
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"images must be float (in value_range [{low:g}, {high:g}]) or uint8, "
                         f"got dtype {x.dtype}")
    x = x.float()
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        raise ValueError(f"the image holds {int((~finite).sum())} NaN or infinite value(s) of "
                         f"{x.numel()}; images must be finite")
    lo, hi = float(x.min()), float(x.max())
    tol = RANGE_TOLERANCE * (high - low)
    if lo < low - tol or hi > high + tol:
        hint = ("(-1, 1)" if lo < 0 else "(0, 255)") if (low, high) == (0.0, 1.0) else "it"
        raise ValueError(f"values in [{lo:.4g}, {hi:.4g}] are outside value_range "
                         f"[{low:g}, {high:g}]; set value_range to {hint}")
    if (low, high) == (0.0, 255.0) and 0.0 < hi <= 1.0:
        raise ValueError(f"values in [{lo:.4g}, {hi:.4g}] under value_range (0, 255) look like "
                         "a [0, 1] image; set value_range=(0, 1)")
    return ((x - low) / (high - low)).clamp_(0, 1)


class TinyVAESettings(BaseModel):
    """The plugin's settings that the SAGE facade shares."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Path | None = Field(None, description="tinyvae_best.pth or .safetensors")
    device: str = Field("cpu", description="'cpu', 'cuda[:N]', 'jetson' (CUDA); None: CUDA if any")
    use_fp16: bool = Field(False, description="float16 autocast on CUDA (no-op on the CPU)")
    step_size: float = Field(0.1, gt=0, description="initial latent step (RMS per element)")
    max_backtracks: int = Field(4, ge=0, description="halvings of a step that raised the energy")
    prior_weight: float = Field(1e-4, ge=0, description="weight of the 0.5*mean(z^2) prior term")
    latent_bound: float = Field(6.0, gt=0, description="latent range (widened to include mu)")
    channel_order: ChannelOrder | None = Field("rgb", description="of 3-channel images")
    value_range: tuple[float, float] = Field((0.0, 1.0), description="range of float pixels")
    input_channels: Literal[1, 3] = Field(3, description="channels of the images (1: grey)")
    img_size: int | None = Field(None, ge=8, multiple_of=8, description="None: the image's")
    resize: bool = Field(False, description="resize other sizes; False: ValueError")
    codes: Path | None = Field(None, description="codes.safetensors of `hrm-vision trust`: the "
                               "8-bit range and token codebooks (None: float latents only)")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"checkpoint file not found: {value} (train one with "
                             "training/distill_tinyvae.py; it writes checkpoints/tinyvae_best.pth)")
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _device_available(cls, value: Any) -> str:
        if value is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        text = "cuda" if str(value) == "jetson" else str(value)
        try:
            device = torch.device(text)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"not a torch device: {value!r} (use 'cpu', 'cuda' or 'jetson')") \
                from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {value!r} needs CUDA, which is not available; use 'cpu'")
        return text

    @field_validator("value_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[1] > value[0]:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value}")
        return value


class TinyVAEConfig(TinyVAESettings, IRPConfig):
    """Config of the ``tinyvae`` plugin; ``checkpoint`` is required."""

    checkpoint: Path | None = Field(description="tinyvae_best.pth or .safetensors (required)")


def load_student(path: str | Path) -> torch.nn.Module:
    """The student of a ``.pth`` or ``.safetensors`` file, on the CPU; else ``CheckpointError``."""
    model = load(path, role="student")
    if not isinstance(model, (MinimalVAE, CompactStudentVAE)):
        raise CheckpointError(f"{path}: the student is a {type(model).__name__}; the tinyvae "
                              "plugin needs a MinimalVAE (TinyVAE) or compact student checkpoint")
    return model


class Perception(NamedTuple):
    """``latent`` ``(B, *latent_shape)``, ``reconstruction`` ``(B, C, H, W)`` in [0, 1] RGB."""

    latent: Tensor
    reconstruction: Tensor
    telemetry: dict[str, Any]


class TinyVAEPlugin(IRPPlugin):
    """The plugin around a TinyVAE student: ``model``, or ``None`` to load ``config.checkpoint``."""

    name = "tinyvae"
    kind = "perception"
    config: TinyVAEConfig

    def __init__(self, config: TinyVAEConfig, model: torch.nn.Module | None = None) -> None:
        super().__init__(config)
        if model is None:
            if config.checkpoint is None:
                raise ValueError("tinyvae config: checkpoint: a checkpoint file is required")
            model = load_student(config.checkpoint)
        self.device = torch.device(config.device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.use_fp16 = config.use_fp16 and self.device.type == "cuda"
        if config.use_fp16 and not self.use_fp16:
            warnings.warn("use_fp16=True is a no-op on the CPU (autocast to float16 runs on CUDA "
                          "only); the model runs in float32", UserWarning, stacklevel=3)
        self.codes = None if config.codes is None else Codes.load(config.codes)
        self.format = ImageFormat(config.value_range, config.channel_order,
                                  config.input_channels, getattr(model, "in_channels", 3),
                                  config.img_size, 8, config.resize)

    def _autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.use_fp16)

    def images(self, x0: Any, task_ctx: dict[str, Any] | None = None) -> Tensor:
        """``x0`` as the model's images; ``task_ctx["channel_order"]`` overrides the config's."""
        order = (task_ctx or {}).get("channel_order", self.config.channel_order)
        if order not in ("rgb", "bgr", None):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {order!r}")
        return to_images(x0, replace(self.format, channel_order=order), self.device)

    def energies(self, z: Tensor, target: Tensor) -> Tensor:
        """Per-image energy ``(B,)`` of latents ``z`` for images ``target``, in float32."""
        with self._autocast():
            mse = (self.model.decode(z).float() - target).pow(2).flatten(1).mean(1)
        return mse + self.config.prior_weight * 0.5 * z.float().pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def encode(self, x0: Any) -> Tensor:
        """The encoder's mean for images ``x0``, ``(B, *latent_shape)`` float32."""
        with self._autocast():
            return self.model.encode(self.images(x0)).float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction of latents ``z``: model images in [0, 1]."""
        with self._autocast():
            return self.model.decode(z).float()

    def to_code(self, z: Tensor, form: str = "float") -> Tensor:
        """Latents ``z`` ``(B, ...)`` as ``form``: themselves, ``uint8`` codes of the same shape,
        or ``int64`` token ids ``(B, stages)``; a ``ValueError`` without a codes file."""
        if form == "float":
            return z
        if form not in ("8bit", "tokens") or self.codes is None:
            raise ValueError(f"form {form!r}: 'float', or '8bit' and 'tokens' with the codes "
                             "setting (the codes.safetensors of `hrm-vision trust`)")
        if form == "8bit":
            return to_8bit_binned(z, self.codes.centre, self.codes.spread)
        return to_tokens(z, self.codes.codebooks)

    def from_code(self, code: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
        """Float32 latents ``(B, *latent_shape)`` of :meth:`to_code`'s output (by its dtype)."""
        if code.is_floating_point():
            return code.float().reshape(-1, *latent_shape)
        if self.codes is None:
            raise ValueError("decoding codes needs the codes setting (`hrm-vision trust`)")
        z = (from_8bit_binned(code.reshape(-1, *latent_shape), self.codes.centre,
                                 self.codes.spread)
             if code.dtype == torch.uint8 else from_tokens(code, self.codes.codebooks))
        return z.reshape(-1, *latent_shape).to(self.device)

    @torch.no_grad()
    def init_state(self, x0: Any, task_ctx: dict[str, Any]) -> IRPState:
        """The encoder's mean for ``x0``; ``meta``: ``target`` (the images), per-image
        ``energies`` and ``step_size``, the latent range ``lower``/``upper``, ``logvar``."""
        target = self.images(x0, task_ctx)
        with self._autocast():
            mu, logvar = self.model.posterior(target)
        mu = mu.float()
        energies = self.energies(mu, target)
        bound = torch.full_like(mu, self.config.latent_bound)
        meta = {"target": target, "energies": energies, "batch_size": len(mu),
                "logvar": logvar.float(), "lower": torch.minimum(mu, -bound),
                "upper": torch.maximum(mu, bound),
                "step_size": torch.full((len(mu),), self.config.step_size, device=mu.device)}
        return IRPState(mu, 0, float(energies.mean()), meta)

    @torch.no_grad()
    def energy(self, state: IRPState) -> float:
        return float(self.energies(state.x, state.meta["target"]).mean())

    def project(self, state: IRPState) -> IRPState:
        z = torch.clamp(state.x, state.meta["lower"], state.meta["upper"])
        return state if torch.equal(z, state.x) else IRPState(z, state.step_idx, None, state.meta)

    def step(self, state: IRPState) -> IRPState:
        z, meta = state.x, state.meta
        target, old = meta["target"], meta["energies"]
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.energies(zg, target).sum(), zg)
        per_image = (-1,) + (1,) * (z.dim() - 1)
        grad = grad.float()
        direction = grad / grad.pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-12).view(per_image)
        size = meta["step_size"].clone()
        new_z, new_e = z.clone(), old.clone()
        pending = torch.ones_like(old, dtype=torch.bool)
        with torch.no_grad():
            for _ in range(self.config.max_backtracks + 1):
                idx = pending.nonzero().squeeze(1)
                cand = torch.clamp(z[idx] - size[idx].view(per_image) * direction[idx],
                                   meta["lower"][idx], meta["upper"][idx]).to(z.dtype)
                e = self.energies(cand, target[idx])
                ok = e <= old[idx]
                new_z[idx[ok]], new_e[idx[ok]] = cand[ok], e[ok]
                pending[idx[ok]] = False
                size[idx[~ok]] *= 0.5
                if not pending.any():
                    break
            size[~pending] *= STEP_GROWTH
        meta = {**meta, "energies": new_e, "step_size": size}
        return IRPState(new_z, state.step_idx + 1, float(new_e.mean()), meta)

    def perceive(self, x0: Any, task_ctx: dict[str, Any] | None = None,
                 max_steps: int | None = None, input_id: str | int | None = None) -> Perception:
        """Refine ``x0``: its latent, reconstruction and telemetry."""
        result = self.run(x0, task_ctx, max_steps, input_id)
        latent = result.state.x.detach()
        return Perception(latent, self.decode(latent), result.telemetry)


@hookimpl
def register_irp_plugins(register: Any) -> None:
    register("tinyvae", TinyVAEPlugin, TinyVAEConfig, kind="perception",
             description="TinyVAE encoder (distilled student) refined in latent space")
