"""``imagefolder``: every image under a folder (recursive), centre-cropped and resized.

Files with a common image extension are found recursively (hidden files and folders skipped) and
assigned to train or validation by a hash of their path relative to the folder and of ``seed``:
the split is deterministic, does not depend on the order files are listed in, and a file keeps
its split when others are added.

The images of the requested split are decoded once at construction (with a progress bar), centre
cropped to a square, resized to ``image_size`` and kept as uint8 (``3 * S * S`` bytes each, 3 KB
at 32 px). 16-bit and float files are scaled by their bit depth (16-bit values / 65535, floats
in [0, 1] as they are; see :mod:`hrm_vision.data.images`). Files that cannot be decoded, or
whose pixel scale is unknown (32-bit integers, floats outside [0, 1], NaN), are skipped, counted
and logged with the reason, never fatal; a folder with no readable image is a ``ValueError``
naming it. Items are deterministic per index (no random
augmentation), which lets the distiller cache the teacher's outputs.

Needs the ``train`` extra (pillow decodes the files, tqdm shows progress): ``pip install
'hrm-vision[train]'``; both are imported when a folder is read.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._extras import require
from .images import load_square_uint8

log = logging.getLogger(__name__)

#: Extensions (lower case) treated as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
})
#: Default fraction of files assigned to the validation split.
VAL_FRACTION = 0.1


def find_images(root: Path) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of image files under ``root``, recursively."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(rel.as_posix())
    return sorted(found)


def split_score(rel_path: str, seed: int) -> float:
    """A number in [0, 1) fixed by ``(seed, rel_path)``; files below the val fraction are val."""
    digest = hashlib.sha256(f"{seed}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_files(files: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...]}`` by hash score; each split gets at least one file
    when there are two or more."""
    scores = {f: split_score(f, seed) for f in files}
    val = [f for f in files if scores[f] < val_fraction]
    train = [f for f in files if scores[f] >= val_fraction]
    if len(files) >= 2 and val_fraction > 0 and not val:
        val = [min(train, key=scores.__getitem__)]
        train.remove(val[0])
    if len(files) >= 2 and not train:
        train = [max(val, key=scores.__getitem__)]
        val.remove(train[0])
    return {"train": train, "val": val}


def load_image(path: Path, image_size: int) -> np.ndarray:
    """``path`` as an ``(S, S, 3)`` uint8 RGB array: centre-cropped square, resized (Lanczos).

    16-bit and float files are scaled to [0, 1] by their bit depth first (see
    :func:`hrm_vision.data.images.load_square_uint8`). Raises what Pillow raises for a file it
    cannot decode (``OSError``, ``ValueError``, ...) and
    :class:`~hrm_vision.data.images.UnsupportedImageError` for pixels whose scale is unknown.
    """
    return load_square_uint8(path, image_size, purpose="the 'imagefolder' dataset")


class ImageFolderImages(Dataset[Tensor]):
    """Images under ``root``; items are ``(3, S, S)`` float RGB in [0, 1].

    Args:
        root: the folder (searched recursively).
        split: ``"train"`` or ``"val"``.
        image_size: side S of the square crops (32).
        seed: changes which files are held out for validation.
        val_fraction: expected fraction of files in the validation split, in [0, 1).

    Attributes:
        files: relative paths of the images kept, in item order.
        skipped: ``(relative path, reason)`` of the files of this split that could not be read.
    """

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 32,
                 seed: int = 0, val_fraction: float = VAL_FRACTION) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ValueError(f"image folder not found: {self.root} (check --data-dir)")
        all_files = find_images(self.root)
        if not all_files:
            raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found "
                             f"under {self.root}")
        candidates = split_files(all_files, val_fraction, seed)[split]
        tqdm = require("tqdm", extra="train", purpose="the 'imagefolder' dataset").tqdm
        require("PIL.Image", extra="train", purpose="the 'imagefolder' dataset")
        self.files: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        arrays = []
        for rel in tqdm(candidates, desc=f"imagefolder {split}", unit="img", leave=False,
                        disable=len(candidates) < 1000):
            try:
                arrays.append(load_image(self.root / rel, image_size))
            except Exception as exc:  # PIL raises many types for broken files; all are skipped
                self.skipped.append((rel, f"{type(exc).__name__}: {exc}".splitlines()[0]))
                continue
            self.files.append(rel)
        if self.skipped:
            shown = "; ".join(f"{rel}: {reason}" for rel, reason in self.skipped[:3])
            more = f" (+{len(self.skipped) - 3} more in .skipped)" if len(self.skipped) > 3 else ""
            log.warning("imagefolder %s: skipped %d unreadable file(s) of %d in %s: %s%s",
                        split, len(self.skipped), len(candidates), self.root, shown, more)
        if not arrays:
            detail = (f"the {len(self.skipped)} image file(s) of this split (of "
                      f"{len(all_files)} in the folder) could not be decoded, first "
                      f"{self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else
                      f"all {len(all_files)} image file(s) went to the other split")
            raise ValueError(f"no readable images for the {split!r} split in {self.root}: "
                             f"{detail}")
        self.images_uint8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return self.images_uint8.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images_uint8[index].float().div_(255.0)
