"""Datasets and image files. Every dataset keeps its images as uint8 and yields ``(3, S, S)``
float RGB tensors in [0, 1], deterministic per index (the distiller caches the teacher's
outputs). :func:`build_dataset` builds the ``"train"`` or ``"val"`` split of ``photos``
(:class:`PhotoCrops`, needs the ``photos`` extra), ``cifar10`` (:class:`CIFAR10Images`, read by
:func:`load_batch`) or ``imagefolder`` (:class:`ImageFolderImages`, split by
:func:`folder_files`); ``crops="stream"`` makes the training split a :class:`CropStream`.
Image files are scaled by their bit depth (:func:`read_image`; docs/robustness.md).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import pickle
import stat
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ._extras import require

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- image files
MODES_16BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})  #: Pillow's 16-bit modes
I_MODE_16BIT_FORMATS = frozenset({"PNG", "PPM"})  #: formats whose ``I`` mode holds 16 bits
MAX_PIXELS = 50_000_000  #: default largest width x height of an image file that is decoded
MAX_PIXELS_ENV = "HRM_VISION_MAX_IMAGE_PIXELS"  #: replaces :data:`MAX_PIXELS`


class UnsupportedImageError(ValueError):
    """An image file whose pixel values cannot be mapped to [0, 1]; the message says why."""


def _pil(purpose: str) -> tuple[Any, Any]:
    image = require("PIL.Image", extra="train", purpose=purpose)
    return image, require("PIL.ImageOps", extra="train", purpose=purpose)


def is_high_depth(img: Any) -> bool:
    """True for the single-channel modes that need scaling (16-bit, 32-bit integer, float)."""
    return img.mode in MODES_16BIT or img.mode in ("I", "F")


def single_channel_unit(img: Any, source: str = "image", fmt: str | None = None) -> np.ndarray:
    """A high-depth (:func:`is_high_depth`) PIL image as an ``(H, W)`` float32 array in [0, 1]
    (``fmt``, the file format, tells whether an ``I`` image is 16-bit);
    :class:`UnsupportedImageError` when the scale is unknown."""
    fmt = fmt or img.format
    if img.mode in MODES_16BIT:
        return np.asarray(img, dtype=np.float32) / 65535.0
    if img.mode == "I":
        values = np.asarray(img, dtype=np.int64)
        if fmt in I_MODE_16BIT_FORMATS and values.size and values.min() >= 0 \
                and values.max() <= 65535:
            return (values / 65535.0).astype(np.float32)
        raise UnsupportedImageError(
            f"{source}: 32-bit integer pixels ({fmt or 'unknown'} format), whose range is "
            "unknown; save it as 8- or 16-bit")
    values = np.asarray(img, dtype=np.float32)  # mode "F"
    if not np.isfinite(values).all():
        raise UnsupportedImageError(f"{source}: float pixels with NaN or infinite values")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        raise UnsupportedImageError(
            f"{source}: float pixels in [{lo:.4g}, {hi:.4g}], outside [0, 1], so their scale "
            "is unknown; save floats in [0, 1], or as 8- or 16-bit")
    return values


def open_image(path: str | os.PathLike[str], purpose: str = "reading images",
               max_pixels: int | None = None) -> tuple[Any, str | None]:
    """``(image with EXIF orientation applied, file format)`` of ``path``, opened with Pillow.
    Raises ``OSError`` for a missing or undecodable file, :class:`UnsupportedImageError` for one
    that is not regular or has more than ``max_pixels`` pixels (read from the header),
    ``ValueError`` for an image with no pixels."""
    image, ops = _pil(purpose)
    path = Path(path)
    limit = max_pixels
    if limit is None:  # the positive integer in $HRM_VISION_MAX_IMAGE_PIXELS, or MAX_PIXELS
        raw = os.environ.get(MAX_PIXELS_ENV, str(MAX_PIXELS))
        limit = int(raw) if raw.strip().isdecimal() else 0
        if limit <= 0:
            raise ValueError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive integer")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a missing file: FileNotFoundError naming it
        raise UnsupportedImageError(f"{path}: not a regular file (a folder, FIFO, socket or "
                                    "device); only image files are read")
    try:
        with warnings.catch_warnings():  # the limit below replaces Pillow's bomb warning
            warnings.simplefilter("ignore", image.DecompressionBombWarning)
            img = image.open(path)
        with img:
            width, height = img.size
            if width * height > limit:
                raise UnsupportedImageError(
                    f"{path}: {width}x{height} = {width * height:,} pixels, more than the limit "
                    f"of {limit:,} (set {MAX_PIXELS_ENV} to read larger images)")
            img.load()
            if width == 0 or height == 0:
                raise ValueError(f"{path}: the image has no pixels ({width}x{height})")
            return ops.exif_transpose(img), img.format
    except image.DecompressionBombError as exc:  # Pillow's own bound, above ours by default
        raise UnsupportedImageError(f"{path}: {exc} (set {MAX_PIXELS_ENV} and "
                                    "PIL.Image.MAX_IMAGE_PIXELS to read it)") from exc
    except image.UnidentifiedImageError as exc:
        if path.suffix.lower() in (".tif", ".tiff"):
            raise image.UnidentifiedImageError(
                f"{exc} (Pillow reads 8- and 16-bit TIFFs and single-channel float TIFFs; "
                "multi-channel float TIFFs are not supported: save them as 16-bit)") from exc
        raise


def read_image(path: str | os.PathLike[str], purpose: str = "reading images",
               max_pixels: int | None = None) -> np.ndarray:
    """``path`` as an ``(H, W, 3)`` float32 RGB array in [0, 1], scaled by its bit depth (grey
    repeated over the channels, alpha dropped)."""
    img, fmt = open_image(path, purpose, max_pixels)
    if is_high_depth(img):
        gray = single_channel_unit(img, str(path), fmt)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def load_square_uint8(path: str | os.PathLike[str], image_size: int) -> np.ndarray:
    """``path`` as an ``(S, S, 3)`` uint8 RGB array: centre-cropped square, resized (Lanczos);
    16-bit and float files are scaled to [0, 1] and resized as floats, then rounded."""
    image, ops = _pil("the 'imagefolder' dataset")
    img, fmt = open_image(path, "the 'imagefolder' dataset")
    size = (image_size, image_size)
    if not is_high_depth(img):
        square = ops.fit(img.convert("RGB"), size, method=image.Resampling.LANCZOS)
        return np.asarray(square, dtype=np.uint8)
    gray = image.fromarray(single_channel_unit(img, str(path), fmt))  # float32: mode "F"
    fitted = np.asarray(ops.fit(gray, size, method=image.Resampling.LANCZOS), dtype=np.float32)
    as_uint8 = np.rint(np.clip(fitted, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(as_uint8[:, :, None], 3, axis=2)


def read_uint8(path: str | os.PathLike[str]) -> np.ndarray:
    """``path`` at full size as an ``(H, W, 3)`` uint8 RGB array (16-bit and float files scaled
    to [0, 1], then rounded)."""
    img, fmt = open_image(path, "the 'imagefolder' dataset")
    if not is_high_depth(img):
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    gray = single_channel_unit(img, str(path), fmt)
    as_uint8 = np.rint(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(as_uint8[:, :, None], 3, axis=2)


# ---------------------------------------------------------------------- datasets
class _Uint8Images(Dataset[Tensor]):
    """Images held as ``images_uint8`` ``(N, 3, S, S)``; items ``(3, S, S)`` float in [0, 1]."""

    images_uint8: Tensor

    def __len__(self) -> int:
        return self.images_uint8.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images_uint8[index].float().div_(255.0)


def _check_split(split: str, image_size: int) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")


_PURPOSE = "the 'photos' dataset"  #: what the missing-extra message names

#: Natural photographs bundled in the scikit-image wheel (grey ones are repeated to RGB).
#: ``motorcycle`` is the left view of ``stereo_motorcycle``.
PHOTOS: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "page",
    "retina", "rocket", "text",
)
VAL_PHOTOS: tuple[str, ...] = ("coffee", "rocket", "camera")  #: held out by default
SCALES: tuple[float, ...] = (1.0, 0.5, 0.25)  #: rescaling factors of a photo before cropping
MIN_CROP_STD = 0.03  #: crops with a lower pixel standard deviation are rejected


def load_photo(name: str) -> np.ndarray:
    """Photograph ``name`` as an (H, W, 3) uint8 RGB array (from the files in the wheel); an
    ``ImportError`` naming the ``photos`` extra without scikit-image."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    require("skimage.data", extra="photos", purpose=_PURPOSE)  # also when cached
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
    """``num_crops`` random crops ``(N, 3, S, S)`` uint8 of the named photos (see
    :func:`crop_images`)."""
    return crop_images([load_photo(name) for name in photos], num_crops, image_size, seed,
                       scales, label=f"photo of {list(photos)}")


def crop_images(images: Sequence[np.ndarray], num_crops: int, image_size: int, seed: int,
                scales: Sequence[float] = SCALES, label: str = "image") -> Tensor:
    """``num_crops`` random crops ``(N, 3, S, S)`` uint8 of (H, W, 3) uint8 ``images``, spread
    evenly over every (image, scale) pair at least ``image_size`` on each side (``label`` names
    them in the error when there is none)."""
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
            if pixel_std(crop) >= MIN_CROP_STD:
                break
        crops[i] = crop
    order = rng.permutation(num_crops)
    return torch.from_numpy(crops[order]).permute(0, 3, 1, 2).contiguous()


class PhotoCrops(_Uint8Images):
    """Crops of scikit-image's photographs: ``"val"`` of ``val_photos``, ``"train"`` of the
    others; ``num_crops`` 16384 (train) or 1024 (val) by default, placed by ``seed``."""

    def __init__(self, split: str = "train", image_size: int = 32, num_crops: int | None = None,
                 seed: int = 0, val_photos: Sequence[str] = VAL_PHOTOS) -> None:
        _check_split(split, image_size)
        unknown = sorted(set(val_photos) - set(PHOTOS))
        if unknown:
            raise ValueError(f"unknown validation photos {unknown}; choose from {PHOTOS}")
        self.photos = tuple(p for p in PHOTOS if (p in val_photos) == (split == "val"))
        n = num_crops if num_crops is not None else (16384 if split == "train" else 1024)
        self.images_uint8 = make_crops(self.photos, n, image_size,
                                       seed + (1_000_003 if split == "val" else 0))


BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_FILES: tuple[str, ...] = ("test_batch",)
CIFAR_SIZE = 32

#: The only globals a CIFAR batch pickle may reference (numpy array reconstruction).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}")
        return super().find_class(module, name)


def load_batch(path: Path) -> np.ndarray:
    """Images of one CIFAR batch file as ``(N, 3, 32, 32)`` uint8; ``ValueError`` if not one."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(io.BufferedReader(f), encoding="latin1").load()
        data = np.asarray(entry["data"])
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError,
            AttributeError, IndexError) as exc:
        raise ValueError(f"{path} is not a readable CIFAR-10 batch (corrupt or truncated?): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                         "delete it and pass --download, or replace the files") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIZE ** 2:
        raise ValueError(f"{path} is not a CIFAR-10 batch: data has shape {data.shape} "
                         f"({data.dtype}), expected (N, 3072) uint8")
    return data.reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE)


def ensure_files(root: Path, files: tuple[str, ...], download: bool) -> None:
    """Make sure ``root/cifar-10-batches-py/<files>`` exist, downloading only if allowed."""
    missing = [name for name in files if not (root / BATCH_DIR / name).is_file()]
    if not missing:
        return
    if not download:
        raise ValueError(
            f"CIFAR-10 not found in {root / BATCH_DIR} (missing {', '.join(missing)}): pass "
            f"--download to fetch it (about 170 MB), or put the extracted '{BATCH_DIR}' folder "
            f"into --data-dir ({root})")
    utils = require("torchvision.datasets.utils", extra="train", purpose="downloading CIFAR-10")
    cifar = require("torchvision.datasets", extra="train", purpose="downloading CIFAR-10").CIFAR10
    try:
        utils.download_and_extract_archive(cifar.url, str(root), filename=cifar.filename,
                                           md5=cifar.tgz_md5)
    except Exception as exc:  # network errors come in many types
        raise ValueError(f"downloading CIFAR-10 into {root} failed ({type(exc).__name__}: "
                         f"{exc}); put the extracted '{BATCH_DIR}' folder into --data-dir "
                         "instead") from None


class CIFAR10Images(_Uint8Images):
    """The 50000 training (``"train"``) or 10000 test (``"val"``) CIFAR-10 images in
    ``data_dir``, resized (bilinear, antialiased) when ``image_size`` is not 32."""

    def __init__(self, split: str = "train", data_dir: str | Path = "./data",
                 image_size: int = CIFAR_SIZE, download: bool = False) -> None:
        _check_split(split, image_size)
        root = Path(data_dir).expanduser()
        files = TRAIN_FILES if split == "train" else VAL_FILES
        ensure_files(root, files, download)
        batches = [load_batch(root / BATCH_DIR / name) for name in files]
        self.images_uint8 = torch.from_numpy(np.concatenate(batches))
        self.image_size = image_size

    def __getitem__(self, index: int) -> Tensor:
        x = super().__getitem__(index)
        if self.image_size != CIFAR_SIZE:
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)[0].clamp_(0.0, 1.0)
        return x


IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
})
VAL_FRACTION = 0.1  #: default fraction of the files in the validation split


def split_files(files: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...]}``: a file is val when a number in [0, 1) fixed by
    ``(seed, path)`` is below ``val_fraction``; each split gets a file when there are two."""
    scores = {f: int.from_bytes(hashlib.sha256(f"{seed}:{f}".encode()).digest()[:8], "big")
              / 2.0 ** 64 for f in files}
    val = [f for f in files if scores[f] < val_fraction]
    train = [f for f in files if scores[f] >= val_fraction]
    if len(files) >= 2 and val_fraction > 0 and not val:
        val = [min(train, key=scores.__getitem__)]
        train.remove(val[0])
    if len(files) >= 2 and not train:
        train = [max(val, key=scores.__getitem__)]
        val.remove(train[0])
    return {"train": train, "val": val}


def folder_files(root: Path, split: str, seed: int = 0,
                 val_fraction: float = VAL_FRACTION) -> list[str]:
    """Relative paths of the images of ``split`` (``"train"``, ``"val"`` or ``"all"``) under
    ``root`` (recursive, hidden entries skipped): with ``root/train/`` and ``root/val/`` folders
    those are the split, else :func:`split_files` by ``seed``."""
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root} (check --data-dir)")
    found = [path.relative_to(root) for path in root.rglob("*")
             if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]
    files = sorted(rel.as_posix() for rel in found
                   if not any(part.startswith(".") for part in rel.parts))
    if not files:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found "
                         f"under {root}")
    if split == "all":
        return files
    if (root / "train").is_dir() and (root / "val").is_dir():
        chosen = [f for f in files if f.startswith(f"{split}/")]
        if not chosen:
            raise ValueError(f"no image files under {root / split}")
        return chosen
    return split_files(files, val_fraction, seed)[split]


def read_images(root: Path, files: Sequence[str], reader: Callable[[Path], np.ndarray],
                split: str) -> tuple[list[np.ndarray], list[str], list[tuple[str, str]]]:
    """``(arrays, files read, (file, reason) skipped)`` of ``reader(root / file)`` for each
    of ``split``'s ``files``; undecodable files are skipped and logged; none readable is an
    error."""
    tqdm = require("tqdm", extra="train", purpose="the 'imagefolder' dataset").tqdm
    require("PIL.Image", extra="train", purpose="the 'imagefolder' dataset")
    arrays, kept, skipped = [], [], []
    for rel in tqdm(files, desc=f"imagefolder {split}", unit="img", leave=False,
                    disable=len(files) < 1000):
        try:
            arrays.append(reader(root / rel))
            kept.append(rel)
        except Exception as exc:  # PIL raises many types for broken files; all are skipped
            skipped.append((rel, f"{type(exc).__name__}: {exc}".splitlines()[0]))
    if skipped:
        shown = "; ".join(f"{rel}: {reason}" for rel, reason in skipped[:3])
        more = f" (+{len(skipped) - 3} more in .skipped)" if len(skipped) > 3 else ""
        log.warning("imagefolder %s: skipped %d unreadable file(s) of %d in %s: %s%s",
                    split, len(skipped), len(files), root, shown, more)
    if not arrays:
        total = len(folder_files(root, "all"))
        detail = (f"the {len(skipped)} image file(s) of this split (of {total} in the folder) "
                  f"could not be decoded, first {skipped[0][0]}: {skipped[0][1]}" if skipped
                  else f"all {total} image file(s) went to the other split")
        raise ValueError(f"no readable images for the {split!r} split in {root}: {detail}")
    return arrays, kept, skipped


class ImageFolderImages(_Uint8Images):
    """Images under ``root`` (:func:`folder_files`), each centre cropped and resized once.
    ``files``: relative paths of the images kept, in item order; ``skipped``: ``(relative path,
    reason)`` of the files of this split that could not be read."""

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 32,
                 seed: int = 0, val_fraction: float = VAL_FRACTION) -> None:
        _check_split(split, image_size)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root).expanduser()
        candidates = folder_files(self.root, split, seed, val_fraction)
        arrays, self.files, self.skipped = read_images(
            self.root, candidates, lambda path: load_square_uint8(path, image_size), split)
        self.images_uint8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------- crop streams
STREAM_SCALES = (0.25, 1.0)  #: a photo's scales before a crop: validation's, training's default
#: A crop reduced more than this many times is box-reduced first (Pillow's ``reducing_gap``, or
#: a level of :func:`crop_levels`) and judged flat on a subsample (docs/training.md: the times);
#: one reduced at most 4x (all of :data:`STREAM_SCALES`) is the plain antialiased resize.
REDUCING_GAP = 4.0
#: The "epoch" of the fixed sample of training crops that validation measures (never trained).
PROBE_EPOCH = 2**32 - 1


def crop_levels(photo: np.ndarray, size: int,
                scales: tuple[float, float] = STREAM_SCALES) -> tuple[np.ndarray, ...]:
    """``(photo, photo / 2, photo / 4, ...)``: an ``(H, W, 3)`` uint8 photograph and its box
    reductions by 2 (Pillow's ``reduce``), as many as :func:`random_crop` at ``scales`` uses."""
    image = require("PIL.Image", extra="train", purpose="streamed crops")
    widest = 1.0 / max(scales[0], size / min(photo.shape[:2]))  # the largest reduction drawn
    levels = [photo]
    while widest > REDUCING_GAP * 2 ** (len(levels) - 1):
        levels.append(np.asarray(image.fromarray(levels[-1]).reduce(2)))
    return tuple(levels)


def pixel_std(pixels: np.ndarray) -> float:
    """The standard deviation of uint8 ``pixels`` (any shape) over 255, from exact integer sums:
    ``ndarray.std`` to 1e-16, without its float64 copy of the pixels."""
    n, s = pixels.size, int(pixels.sum(dtype=np.int64))
    q = int(np.square(pixels, dtype=np.uint32).sum(dtype=np.int64))
    return math.sqrt((n * q - s * s) / (n * n)) / 255.0


def random_crop(photo: np.ndarray | Sequence[np.ndarray], size: int, rng: np.random.Generator,
                scales: tuple[float, float] = STREAM_SCALES) -> Tensor:
    """One ``(3, S, S)`` uint8 crop of an ``(H, W, 3)`` uint8 photograph at least ``S`` on each
    side: the photograph scaled by ``s`` uniform in ``scales`` (at least ``S / min(H, W)``: a
    square of side ``S / s`` resized to ``S``), a random square of it, flipped left-right half of
    the time; crops flatter than :data:`MIN_CROP_STD` are drawn again (20 tries; a square over
    ``REDUCING_GAP`` times ``S`` is judged on every ``side // (REDUCING_GAP * S)``-th pixel).
    From :func:`crop_levels`, a square reduced over ``REDUCING_GAP`` times is cut from the level
    ``k`` that leaves it reduced 2-4x more (the same draws, divided by ``2**k``)."""
    levels = (photo,) if isinstance(photo, np.ndarray) else tuple(photo)
    h, w = levels[0].shape[:2]
    low = max(scales[0], size / min(h, w))
    for _ in range(20):
        side = min(h, w, max(size, round(size / rng.uniform(low, max(low, scales[1])))))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        k = 0
        while k + 1 < len(levels) and side > REDUCING_GAP * size * 2 ** k:
            k += 1
        cut = side >> k
        crop = levels[k][y >> k:(y >> k) + cut, x >> k:(x >> k) + cut]
        step = max(1, int(cut // (REDUCING_GAP * size)))
        if pixel_std(crop[::step, ::step]) >= MIN_CROP_STD:
            break
    if cut != size:  # Pillow's bilinear filter, widened when it reduces (antialiased)
        image = require("PIL.Image", extra="train", purpose="streamed crops")
        crop = np.asarray(image.fromarray(np.ascontiguousarray(crop)).resize(
            (size, size), image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))


class CropStream(Dataset[Tensor]):
    """``num_crops`` crops ``(3, S, S)`` float in [0, 1] per epoch, drawn afresh every epoch
    from full-size ``photos`` ((H, W, 3) uint8; those under ``S`` on a side are left out) by
    :func:`random_crop`: item ``i`` of epoch ``e`` (:meth:`set_epoch`) is the same for the same
    ``(seed, e, i)`` in any process or DataLoader worker. ``scales``: :func:`random_crop`'s
    (each photograph is kept with its :func:`crop_levels` for them)."""

    def __init__(self, photos: Sequence[np.ndarray], num_crops: int, image_size: int,
                 seed: int, label: str = "photograph",
                 scales: tuple[float, float] = STREAM_SCALES) -> None:
        self.photos = [p for p in photos if min(p.shape[:2]) >= image_size]
        if not self.photos:
            raise ValueError(f"no {label} is at least {image_size}px on each side")
        self.num_crops, self.image_size, self.seed, self.epoch = num_crops, image_size, seed, 0
        self.scales = scales
        self.levels = [crop_levels(p, image_size, scales) for p in self.photos]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_crops

    def _draw(self, index: int, epoch: int | None) -> tuple[np.random.Generator, int]:
        if not 0 <= index < self.num_crops:
            raise IndexError(f"crop {index} of {self.num_crops}")
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])
        return rng, int(rng.integers(len(self.photos)))

    def crop(self, index: int, epoch: int | None = None) -> Tensor:
        """Item ``index`` of ``epoch`` (default: the current one) as ``(3, S, S)`` uint8."""
        rng, photo = self._draw(index, epoch)
        return random_crop(self.levels[photo], self.image_size, rng, self.scales)

    def photo(self, index: int, epoch: int | None = None) -> int:
        """The index in ``photos`` of the photograph item ``index`` of ``epoch`` is cut from."""
        return self._draw(index, epoch)[1]

    def __getitem__(self, index: int) -> Tensor:
        return self.crop(index).float().div_(255.0)

    def fixed(self, num_crops: int, epoch: int = 0) -> FixedCrops:
        """The first ``num_crops`` items of ``epoch``, drawn once."""
        return FixedCrops(torch.stack([self.crop(i, epoch) for i in range(num_crops)]))


class FixedCrops(_Uint8Images):
    """A fixed set of crops ``images_uint8`` ``(N, 3, S, S)``."""

    def __init__(self, images_uint8: Tensor) -> None:
        self.images_uint8 = images_uint8


def photographs(name: str, split: str, data_dir: str | Path = "./data",
                seed: int = 0) -> list[np.ndarray]:
    """The full-size ``(H, W, 3)`` uint8 photographs of ``split`` (``"train"``, ``"val"`` or
    ``"all"``) of ``photos`` (held out: :data:`VAL_PHOTOS`) or ``imagefolder`` (``data_dir``,
    :func:`folder_files`)."""
    if name == "photos":
        return [load_photo(p) for p in PHOTOS if split == "all" or (p in VAL_PHOTOS) == (
            split == "val")]
    if name == "imagefolder":
        root = Path(data_dir).expanduser()
        return read_images(root, folder_files(root, split, seed), read_uint8, split)[0]
    raise ValueError(f"dataset {name!r} has no photographs to stream crops from; use photos "
                     "or imagefolder")


# ---------------------------------------------------------------------- by name
DATASETS: tuple[str, ...] = ("cifar10", "imagefolder", "photos")  #: :func:`build_dataset`'s


def build_dataset(name: str, split: str, image_size: int = 32, seed: int = 0,
                  data_dir: str | Path = "./data", download: bool = False,
                  crops: str = "fixed", num_crops: int | None = None,
                  crop_scales: tuple[float, float] = STREAM_SCALES) -> Dataset[Tensor]:
    """The ``split`` ("train" or "val") of dataset ``name``: ``seed`` places the photo crops and
    splits the image folder, ``data_dir`` holds CIFAR-10 or is the image folder, ``download``
    fetches CIFAR-10. ``crops="stream"`` (photos, imagefolder): the training split is a
    :class:`CropStream` of ``num_crops`` (default 16384) crops per epoch at ``crop_scales``, the
    validation split ``num_crops`` (default 1024) fixed crops of the held-out photographs at
    :data:`STREAM_SCALES`."""
    if crops == "stream":
        _check_split(split, image_size)
        train = split == "train"
        stream = CropStream(photographs(name, split, data_dir, seed), num_crops or (
            16384 if train else 1024), image_size, seed + (0 if train else 1_000_003),
            label=f"{name} {split} photograph", scales=crop_scales if train else STREAM_SCALES)
        return stream if train else stream.fixed(len(stream))
    if name == "photos":
        return PhotoCrops(split, image_size=image_size, seed=seed)
    if name == "cifar10":
        return CIFAR10Images(split, data_dir=data_dir, image_size=image_size, download=download)
    if name == "imagefolder":
        return ImageFolderImages(data_dir, split, image_size=image_size, seed=seed)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


def unseen_crops(name: str, num_crops: int, image_size: int, data_dir: str | Path = "./data",
                 seed: int = 0) -> FixedCrops:
    """``num_crops`` fixed crops (:func:`random_crop`) of every photograph of another
    collection: all of ``photos``, or every image under the folder ``data_dir``."""
    return CropStream(photographs(name, "all", data_dir, seed), num_crops, image_size,
                      seed + 2_000_003, label=f"{name} photograph").fixed(num_crops)


def validation_images(dataset: str, num_images: int, image_size: int,
                      data_dir: str = "./data", split: str = "val") -> Tensor:
    """The first ``num_images`` images of ``dataset``'s ``split`` (validation by default),
    (N, 3, S, S) in [0, 1]."""
    ds = build_dataset(dataset, split, image_size=image_size, data_dir=data_dir)
    return torch.stack([ds[i] for i in range(min(num_images, len(ds)))])
