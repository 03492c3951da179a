"""Dataset registry. Every dataset yields (3, S, S) float RGB tensors in [0, 1].

``build_dataset(name, split, **options)`` returns a ``torch.utils.data.Dataset``;
``split`` is ``"train"`` or ``"val"``. Registered names are in ``DATASETS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .cifar10 import CIFAR10Images
from .imagefolder import ImageFolderImages
from .photos import PhotoCrops

DatasetFactory = Callable[..., Dataset]

#: name -> factory(split, **options)
DATASETS: dict[str, DatasetFactory] = {}


def register_dataset(name: str) -> Callable[[DatasetFactory], DatasetFactory]:
    """Decorator registering a dataset factory under ``name``."""

    def deco(factory: DatasetFactory) -> DatasetFactory:
        DATASETS[name] = factory
        return factory

    return deco


@register_dataset("photos")
def _photos(split: str, image_size: int = 32, seed: int = 0, **_: Any) -> Dataset:
    return PhotoCrops(split, image_size=image_size, seed=seed)


@register_dataset("cifar10")
def _cifar10(split: str, image_size: int = 32, data_dir: str = "./data", download: bool = False,
             **_: Any) -> Dataset:
    return CIFAR10Images(split, data_dir=data_dir, image_size=image_size, download=download)


@register_dataset("imagefolder")
def _imagefolder(split: str, image_size: int = 32, seed: int = 0, data_dir: str = "./data",
                 **_: Any) -> Dataset:
    return ImageFolderImages(data_dir, split, image_size=image_size, seed=seed)


def build_dataset(name: str, split: str, **options: Any) -> Dataset:
    """The ``split`` ("train" or "val") of dataset ``name`` with dataset-specific ``options``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](split, **options)


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


__all__ = ["CIFAR10Images", "DATASETS", "ImageFolderImages", "PhotoCrops", "build_dataset",
           "register_dataset", "validation_images"]
