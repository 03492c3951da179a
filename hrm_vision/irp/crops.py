"""Crops as SAGE hands them over, converted to and from the model's images.

SAGE's callers pass crops in several conventions: float tensors NCHW in [0, 1], tensors
normalised to [-1, 1], float tensors in [0, 255], OpenCV crops (numpy HWC, BGR, uint8 or float),
1-channel grey crops, and sizes such as 60x60. :func:`to_model_images` reads each of them through
an explicit :class:`CropFormat` and refuses, with a ``ValueError`` naming the option to set, what
it would otherwise misread; :func:`from_model_images` maps the model's reconstructions back to
the caller's convention.

Layouts: torch tensors are channels-first, ``(B, C, H, W)``, ``(C, H, W)`` or, for grey crops,
``(H, W)``; numpy arrays are channels-last as OpenCV gives them, ``(B, H, W, C)``, ``(H, W, C)``
or, for grey crops, ``(H, W)``. ``uint8`` pixels are read as 0-255 whatever ``value_range`` says
(their dtype says it); float pixels are read in ``value_range``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ChannelOrder = Literal["rgb", "bgr"]
#: Values may exceed ``value_range`` by this share of its width (rounding in the caller's maths).
RANGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CropFormat:
    """How the caller's crops are laid out, and what the model takes.

    Attributes:
        value_range: ``(low, high)`` of float pixels, e.g. ``(0, 1)``, ``(-1, 1)``, ``(0, 255)``.
        channel_order: ``"rgb"`` or ``"bgr"`` for 3-channel crops; ``None``: torch tensors are
            RGB and 3-channel numpy arrays (OpenCV's BGR, usually) are refused.
        input_channels: channels of the caller's crops, 1 (grey) or 3.
        model_channels: channels the model takes; a grey crop is repeated to 3 for an RGB model
            and its reconstruction averaged back to 1.
        img_size: the square side the model sees.
        resize: crops of another size are resized (bilinear, antialiased) to ``img_size``;
            ``False``: they are a ``ValueError``.
    """

    value_range: tuple[float, float] = (0.0, 1.0)
    channel_order: ChannelOrder | None = None
    input_channels: int = 3
    model_channels: int = 3
    img_size: int = 64
    resize: bool = True


def to_model_images(x: Any, fmt: CropFormat, device: torch.device | str = "cpu") -> Tensor:
    """``x`` as a new float tensor ``(B, model_channels, img_size, img_size)`` in [0, 1], RGB.

    The caller's array or tensor is never modified. Raises ``ValueError`` naming the problem
    and the option that fixes it: wrong type, layout or channel count (``input_channels``),
    values outside ``value_range``, a 3-channel numpy array without ``channel_order``, an empty
    or non-finite input, another size with ``resize=False``.
    """
    images, numpy_input = _as_nchw(x, fmt)
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"the input holds no pixels (shape {tuple(images.shape)})")
    if fmt.input_channels == 3:
        order = fmt.channel_order
        if order is None and numpy_input:
            raise ValueError("a 3-channel numpy crop needs channel_order='bgr' (OpenCV) or "
                             "'rgb' in the plugin's config; torch tensors are read as RGB")
        if order == "bgr":
            images = images.flip(1)
    images = images.to(device)
    if fmt.model_channels == 3 and fmt.input_channels == 1:
        images = images.expand(-1, 3, -1, -1)
    size = (fmt.img_size, fmt.img_size)
    if tuple(images.shape[-2:]) != size:
        if not fmt.resize:
            raise ValueError(f"crop size {images.shape[-2]}x{images.shape[-1]} is not the model's "
                             f"{fmt.img_size}x{fmt.img_size}; set resize=True or img_size")
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                               antialias=True).clamp_(0, 1)
    return images.contiguous()


def from_model_images(images: Tensor, fmt: CropFormat) -> Tensor:
    """Model images ``(B, model_channels, S, S)`` in [0, 1] back in the caller's convention:
    ``input_channels`` channels (grey: the mean of RGB), ``channel_order``, ``value_range``."""
    if fmt.input_channels == 1 and images.shape[1] == 3:
        images = images.mean(1, keepdim=True)
    elif fmt.channel_order == "bgr":
        images = images.flip(1)
    low, high = fmt.value_range
    return images * (high - low) + low


def _as_nchw(x: Any, fmt: CropFormat) -> tuple[Tensor, bool]:
    """``x`` as a float NCHW tensor in [0, 1] (a copy); also whether it came from numpy."""
    c = fmt.input_channels
    if isinstance(x, np.ndarray):
        if x.ndim == 2 and c == 1:
            x = x[:, :, None]
        if x.ndim not in (3, 4) or x.shape[-1] != c:
            raise ValueError(f"numpy crops are read channels-last, (H, W, {c}) or (B, H, W, {c}) "
                             f"as OpenCV gives them (input_channels={c}), got {x.shape}")
        tensor = torch.from_numpy(np.array(x[None] if x.ndim == 3 else x, copy=True))
        return _scaled(tensor.permute(0, 3, 1, 2), fmt), True
    if isinstance(x, Tensor):
        if x.dim() == 2 and c == 1:
            x = x[None]
        if x.dim() not in (3, 4) or x.shape[-3] != c:
            raise ValueError(f"torch crops are read channels-first, ({c}, H, W) or (B, {c}, H, W) "
                             f"(input_channels={c}), got {tuple(x.shape)}")
        return _scaled((x[None] if x.dim() == 3 else x).detach().clone(), fmt), False
    raise ValueError(f"expected a torch tensor or a numpy array, got {type(x).__name__}")


def _scaled(x: Tensor, fmt: CropFormat) -> Tensor:
    low, high = fmt.value_range
    if x.dtype == torch.uint8:
        if (low, high) not in ((0.0, 1.0), (0.0, 255.0)):
            raise ValueError(f"uint8 crops hold 0-255, which contradicts value_range "
                             f"{fmt.value_range}")
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"crops must be float (in value_range) or uint8, got dtype {x.dtype}")
    x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"the crop holds {bad} NaN or infinite value(s) of {x.numel()}")
    if x.numel() == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    tol = RANGE_TOLERANCE * (high - low)
    if lo < low - tol or hi > high + tol:
        hint = ("(-1, 1)" if lo < 0 else "(0, 255)") if (low, high) == (0.0, 1.0) else "it"
        raise ValueError(f"crop values in [{lo:.4g}, {hi:.4g}] are outside value_range "
                         f"{fmt.value_range}; set value_range to {hint} in the plugin's config")
    if (low, high) == (0.0, 255.0) and 0.0 < hi <= 1.0:
        raise ValueError(f"crop values in [{lo:.4g}, {hi:.4g}] under value_range (0, 255) look "
                         "like a [0, 1] crop; set value_range=(0, 1)")
    return ((x - low) / (high - low)).clamp_(0, 1)
