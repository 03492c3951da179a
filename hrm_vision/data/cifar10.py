"""``cifar10``: CIFAR-10 in torchvision's on-disk layout, read without unpickling arbitrary objects.

The files are the ones torchvision's ``CIFAR10`` uses: ``<data_dir>/cifar-10-batches-py/``
``data_batch_1`` .. ``data_batch_5`` (train, 50000 images) and ``test_batch`` (validation, 10000
images). They are fetched only when ``download=True``, by torchvision's downloader (URL and MD5 from
``torchvision.datasets.CIFAR10``, the archive is checked against its MD5). Missing files are a
one-line ``ValueError`` giving both ways out. Reading needs only numpy and torch; downloading
needs torchvision (the ``train`` extra).

The batches are Python pickles. torchvision unpickles them with ``pickle.load``, which runs
whatever a tampered file asks for; here they are read with an unpickler that only rebuilds numpy
arrays, lists, strings and numbers, and every batch is checked for the expected shape (a truncated
or foreign file is a clear error, without re-hashing 170 MB on every start).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .._extras import require

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
    datasets = require("torchvision.datasets", extra="train", purpose="downloading CIFAR-10")
    utils = require("torchvision.datasets.utils", extra="train", purpose="downloading CIFAR-10")
    cifar = datasets.CIFAR10
    try:
        utils.download_and_extract_archive(cifar.url, str(root), filename=cifar.filename,
                                           md5=cifar.tgz_md5)
    except Exception as exc:  # network errors come in many types
        raise ValueError(f"downloading CIFAR-10 into {root} failed ({type(exc).__name__}: "
                         f"{exc}); put the extracted '{BATCH_DIR}' folder into --data-dir "
                         "instead") from None


class CIFAR10Images(Dataset[Tensor]):
    """CIFAR-10 images (labels unused); items are ``(3, S, S)`` float RGB in [0, 1].

    Args:
        split: ``"train"`` (the 50000 training images) or ``"val"`` (the 10000 test images).
        data_dir: folder holding ``cifar-10-batches-py`` (torchvision's layout).
        image_size: side S; images other than 32 are resized (bilinear, antialiased).
        download: fetch the archive when files are missing (never otherwise).
    """

    def __init__(self, split: str = "train", data_dir: str | Path = "./data",
                 image_size: int = CIFAR_SIZE, download: bool = False) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        root = Path(data_dir).expanduser()
        files = TRAIN_FILES if split == "train" else VAL_FILES
        ensure_files(root, files, download)
        batches = [load_batch(root / BATCH_DIR / name) for name in files]
        self.images_uint8 = torch.from_numpy(np.concatenate(batches))
        self.image_size = image_size

    def __len__(self) -> int:
        return self.images_uint8.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        x = self.images_uint8[index].float().div_(255.0)
        if self.image_size != CIFAR_SIZE:
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)[0].clamp_(0.0, 1.0)
        return x
