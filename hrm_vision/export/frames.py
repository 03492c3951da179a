"""Real images at any frame size, for parity and speed checks at camera resolutions.

Sizes are written ``HxW`` (height first, as in NCHW): ``480x640`` is a VGA camera frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Frame sizes every export is checked at (square crops, a 224 crop, a VGA frame).
PARITY_SIZES: tuple[tuple[int, int], ...] = ((32, 32), (64, 64), (224, 224), (480, 640))


def parse_size(text: str) -> tuple[int, int]:
    """``"480x640"`` -> ``(480, 640)``; both sides positive multiples of 8, else ``ValueError``."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a frame size is HEIGHTxWIDTH, e.g. 480x640; got {text!r}") from None
    if height < 8 or width < 8 or height % 8 or width % 8:
        raise ValueError(f"frame sides must be positive multiples of 8, got {height}x{width}")
    return height, width


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """A comma-separated list of :func:`parse_size` values."""
    return tuple(parse_size(t) for t in text.split(",") if t.strip())


def photo_frames(height: int, width: int, split: str = "val") -> Tensor:
    """The ``photos`` dataset's photographs of ``split`` as ``(N, 3, height, width)`` frames in
    [0, 1], RGB: each photograph resized (bilinear, antialiased) to cover the frame, then
    centre-cropped. Validation photographs are the ones training never sees (coffee, rocket,
    camera: N = 3). Needs the ``photos`` extra."""
    from ..data import PHOTOS, VAL_PHOTOS, load_photo

    names = VAL_PHOTOS if split == "val" else tuple(p for p in PHOTOS if p not in VAL_PHOTOS)
    frames = []
    for name in names:
        img = torch.from_numpy(load_photo(name)).permute(2, 0, 1)[None].float() / 255.0
        scale = max(height / img.shape[2], width / img.shape[3])
        size = (max(height, round(img.shape[2] * scale)), max(width, round(img.shape[3] * scale)))
        img = F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        frames.append(img[0, :, top:top + height, left:left + width].clamp(0, 1))
    return torch.stack(frames).contiguous()
