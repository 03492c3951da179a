"""Reading image files into the package's convention: float RGB in [0, 1], whatever the bit depth.

Pillow opens 8-bit files (and 16-bit RGB/RGBA PNGs, which it reduces to 8 bits per channel) in
modes that ``convert("RGB")`` handles. It opens three kinds of single-channel file in modes where
``convert("RGB")`` silently breaks them:

- 16-bit integers (``I;16``: 16-bit grayscale PNG, PGM and TIFF) would saturate at 255;
- 32-bit integers (``I``: 16-bit PNG and PGM on some Pillow versions, 32-bit TIFF);
- 32-bit floats (``F``: float TIFF), whose [0, 1] values would read as 0 or 1.

Here 16-bit values are divided by 65535 (``I`` from PNG or PGM holds 16-bit values too, Pillow
scales PGM to that range), and floats in [0, 1] are kept. Anything whose scale cannot be known
(32-bit integer TIFFs, floats outside [0, 1], NaN or infinity) is an
:class:`UnsupportedImageError` that says why. Multi-channel float TIFFs cannot be opened by
Pillow at all; the error says so.

Before anything is decoded, a file must be a regular file (a FIFO or device would block or never
end) and its header's pixel count must be at most ``max_pixels`` (default
:data:`MAX_PIXELS`, 50 million: a 48-megapixel photograph passes; the environment variable
``HRM_VISION_MAX_IMAGE_PIXELS`` changes the default): a small compressed file can declare a
huge image, whose decode would take gigabytes. Both are an :class:`UnsupportedImageError`.

Needs pillow (the ``train`` extra), imported on first use.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import require

#: Pillow modes holding 16-bit unsigned integers.
MODES_16BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
#: Pillow formats whose ``I`` mode holds values scaled to 16 bits.
I_MODE_16BIT_FORMATS = frozenset({"PNG", "PPM"})
#: Default largest pixel count (width x height) of an image file that is decoded.
MAX_PIXELS = 50_000_000
#: Environment variable that replaces :data:`MAX_PIXELS` (a positive integer).
MAX_PIXELS_ENV = "HRM_VISION_MAX_IMAGE_PIXELS"


class UnsupportedImageError(ValueError):
    """An image file whose pixel values cannot be mapped to [0, 1]; the message says why."""


def max_pixels_default() -> int:
    """:data:`MAX_PIXELS`, or the positive integer in ``$HRM_VISION_MAX_IMAGE_PIXELS``.

    Raises:
        ValueError: the variable is set to something else than a positive integer.
    """
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None:
        return MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive integer")
    return value


def _pil(purpose: str) -> tuple[Any, Any]:
    image = require("PIL.Image", extra="train", purpose=purpose)
    ops = require("PIL.ImageOps", extra="train", purpose=purpose)
    return image, ops


def is_high_depth(img: Any) -> bool:
    """True for the single-channel modes that need scaling (16-bit, 32-bit integer, float)."""
    return img.mode in MODES_16BIT or img.mode in ("I", "F")


def single_channel_unit(img: Any, source: str = "image", fmt: str | None = None) -> np.ndarray:
    """A high-depth single-channel PIL image as an ``(H, W)`` float32 array in [0, 1].

    ``fmt`` is the file format Pillow reported (``img.format`` of the opened file), which tells
    whether an ``I`` image holds 16-bit values.

    Raises:
        UnsupportedImageError: a 32-bit integer image of unknown range, or float values that are
            not finite or outside [0, 1].
    """
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
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if not np.isfinite(values).all():
            raise UnsupportedImageError(f"{source}: float pixels with NaN or infinite values")
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise UnsupportedImageError(
                f"{source}: float pixels in [{lo:.4g}, {hi:.4g}], outside [0, 1], so their scale "
                "is unknown; save floats in [0, 1], or as 8- or 16-bit")
        return values
    raise ValueError(f"{source}: mode {img.mode!r} is not a high-depth single-channel mode")


def open_image(path: str | os.PathLike[str], purpose: str = "reading images",
               max_pixels: int | None = None) -> tuple[Any, str | None]:
    """Open ``path`` with Pillow: ``(image with EXIF orientation applied, file format)``.

    ``max_pixels`` (default :func:`max_pixels_default`) bounds width x height, read from the
    header before any pixel is decoded.

    Raises:
        OSError: missing or unreadable file; ``PIL.UnidentifiedImageError`` (an ``OSError``) for a
            file Pillow cannot decode, with a hint for multi-channel float TIFFs.
        UnsupportedImageError: not a regular file, or more pixels than ``max_pixels``.
    """
    image, ops = _pil(purpose)
    path = Path(path)
    limit = max_pixels_default() if max_pixels is None else max_pixels
    mode = os.stat(path).st_mode  # a missing file: FileNotFoundError naming it
    if not stat.S_ISREG(mode):
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
    """``path`` as an ``(H, W, 3)`` float32 RGB array in [0, 1], scaled by its bit depth.

    8-bit files give ``value / 255``; 16-bit files ``value / 65535``; float files their values
    (which must lie in [0, 1]); grayscale is repeated over the three channels; alpha is dropped.

    Raises:
        OSError: missing, unreadable or undecodable file.
        UnsupportedImageError: pixel values whose scale is unknown (see the module docstring).
        ValueError: an image with no pixels.
    """
    img, fmt = open_image(path, purpose, max_pixels)
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{path}: the image has no pixels ({img.width}x{img.height})")
    if is_high_depth(img):
        gray = single_channel_unit(img, str(path), fmt)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def load_square_uint8(path: str | os.PathLike[str], image_size: int,
                      purpose: str = "reading images") -> np.ndarray:
    """``path`` as an ``(S, S, 3)`` uint8 RGB array: centre-cropped square, resized (Lanczos).

    8-bit files take exactly Pillow's uint8 path; 16-bit and float files are scaled to [0, 1]
    first (see :func:`read_image`), resized as floats, then rounded to 8 bits.

    Raises:
        OSError: missing, unreadable or undecodable file.
        UnsupportedImageError: pixel values whose scale is unknown.
        ValueError: an image with no pixels.
    """
    image, ops = _pil(purpose)
    img, fmt = open_image(path, purpose)
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{path}: the image has no pixels ({img.width}x{img.height})")
    size = (image_size, image_size)
    if not is_high_depth(img):
        square = ops.fit(img.convert("RGB"), size, method=image.Resampling.LANCZOS)
        return np.asarray(square, dtype=np.uint8)
    gray = image.fromarray(single_channel_unit(img, str(path), fmt))  # float32: mode "F"
    fitted = np.asarray(ops.fit(gray, size, method=image.Resampling.LANCZOS), dtype=np.float32)
    as_uint8 = np.rint(np.clip(fitted, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(as_uint8[:, :, None], 3, axis=2)


__all__ = ["MAX_PIXELS", "UnsupportedImageError", "load_square_uint8", "max_pixels_default",
           "open_image", "read_image"]
