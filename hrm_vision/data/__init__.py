"""Dataset registry. Every dataset yields (3, S, S) float RGB tensors in [0, 1].

``build_dataset(name, split, **options)`` returns a ``torch.utils.data.Dataset``;
``split`` is ``"train"`` or ``"val"``. Registered names are in ``DATASETS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


__all__ = ["CIFAR10Images", "DATASETS", "ImageFolderImages", "PhotoCrops", "build_dataset",
           "register_dataset"]
