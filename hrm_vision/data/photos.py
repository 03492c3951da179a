"""``photos``: the offline embedded dataset, crops of the real photographs inside scikit-image.

scikit-image ships a few dozen sample images inside its wheel (``skimage.data``); the natural
photographs among them are loaded with scikit-image's own loaders (which read the bundled files
and never download them). Each photograph is rescaled to several scales and random
``image_size`` crops are cut from it, rejecting almost flat crops (black sky, paper).

Train and validation are split *by photograph*: validation crops come from photographs that
training never sees. Everything is deterministic for a given seed. Crops are made once at
construction and kept as a uint8 tensor, so every epoch sees the same images (which is what
lets the distiller cache the frozen teacher's outputs).

Needs the ``photos`` extra (scikit-image, pillow): ``pip install 'hrm-vision[photos]'``. Both are
imported when crops are made, not when this module is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._extras import require

#: What the missing-extra message says needs scikit-image and pillow.
_PURPOSE = "the 'photos' dataset"

#: Natural photographs bundled in the scikit-image wheel (grey ones are repeated to RGB).
#: ``motorcycle`` is the left view of ``stereo_motorcycle``.
PHOTOS: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "page",
    "retina", "rocket", "text",
)
#: Photographs held out for validation by default (two colour, one grey).
VAL_PHOTOS: tuple[str, ...] = ("coffee", "rocket", "camera")
#: Rescaling factors applied to each photograph before cropping.
SCALES: tuple[float, ...] = (1.0, 0.5, 0.25)
#: Crops whose pixel standard deviation (in [0, 1] units) is below this are rejected.
MIN_CROP_STD = 0.03


def load_photo(name: str) -> np.ndarray:
    """Photograph ``name`` as an (H, W, 3) uint8 RGB array (from the files in the wheel).

    Raises ``ValueError`` for an unknown name and an ``ImportError`` naming the ``photos`` extra
    when scikit-image is not installed.
    """
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    require("skimage.data", extra="photos", purpose=_PURPOSE)
    return _load_photo(name)


@cache
def _load_photo(name: str) -> np.ndarray:
    skimage_data = require("skimage.data", extra="photos", purpose=_PURPOSE)
    img = skimage_data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(
        skimage_data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _rescaled(img: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return img
    image = require("PIL.Image", extra="photos", purpose=_PURPOSE)
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(image.fromarray(img).resize(size, image.Resampling.LANCZOS))


def make_crops(photos: Sequence[str], num_crops: int, image_size: int, seed: int,
               scales: Sequence[float] = SCALES) -> Tensor:
    """``num_crops`` random crops, ``(N, 3, image_size, image_size)`` uint8, spread evenly over
    every (photo, scale) pair whose rescaled photo is at least ``image_size`` on each side."""
    return crop_images([load_photo(name) for name in photos], num_crops, image_size, seed,
                       scales, label=f"photo of {list(photos)}")


def crop_images(images: Sequence[np.ndarray], num_crops: int, image_size: int, seed: int,
                scales: Sequence[float] = SCALES, label: str = "image") -> Tensor:
    """:func:`make_crops` of any (H, W, 3) uint8 RGB arrays ``images`` (``label`` names them in
    the error raised when none is large enough)."""
    rng = np.random.default_rng(seed)
    sources = []
    for img in images:
        for s in scales:
            scaled = _rescaled(img, s)
            if min(scaled.shape[:2]) >= image_size:
                sources.append(scaled)
    if not sources:
        raise ValueError(f"no {label} is at least {image_size}px at any scale")
    crops = np.empty((num_crops, image_size, image_size, 3), dtype=np.uint8)
    for i in range(num_crops):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        for _ in range(20):  # reject almost flat crops, keep the last try otherwise
            y, x = rng.integers(0, h - image_size + 1), rng.integers(0, w - image_size + 1)
            crop = img[y:y + image_size, x:x + image_size]
            if crop.std() / 255.0 >= MIN_CROP_STD:
                break
        crops[i] = crop
    order = rng.permutation(num_crops)
    return torch.from_numpy(crops[order]).permute(0, 3, 1, 2).contiguous()


class PhotoCrops(Dataset[Tensor]):
    """Crops of scikit-image's bundled photographs; items are (3, S, S) float RGB in [0, 1].

    Args:
        split: ``"train"`` (photos not in ``val_photos``) or ``"val"`` (``val_photos``).
        image_size: crop side S in pixels (32).
        num_crops: number of crops; defaults to 16384 for train and 1024 for val.
        seed: crop positions; the validation seed is offset so the two splits never share one.
        val_photos: the held-out photographs.
    """

    def __init__(self, split: str = "train", image_size: int = 32, num_crops: int | None = None,
                 seed: int = 0, val_photos: Sequence[str] = VAL_PHOTOS) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        unknown = sorted(set(val_photos) - set(PHOTOS))
        if unknown:
            raise ValueError(f"unknown validation photos {unknown}; choose from {PHOTOS}")
        self.photos = tuple(p for p in PHOTOS if (p in val_photos) == (split == "val"))
        n = num_crops if num_crops is not None else (16384 if split == "train" else 1024)
        self.images_uint8 = make_crops(self.photos, n, image_size,
                                       seed + (1_000_003 if split == "val" else 0))

    def __len__(self) -> int:
        return self.images_uint8.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images_uint8[index].float().div_(255.0)
