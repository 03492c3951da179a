"""The offline photos dataset: range, determinism, split by photograph."""

from __future__ import annotations

import pytest
import torch

from hrm_vision.data import PHOTOS, VAL_PHOTOS, PhotoCrops, build_dataset


def test_items_are_float_rgb_in_unit_range() -> None:
    ds = PhotoCrops("val", num_crops=32)
    x = torch.stack([ds[i] for i in range(len(ds))])
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.05


def test_deterministic_with_seed_and_seed_matters() -> None:
    a, b = PhotoCrops("val", num_crops=16, seed=1), PhotoCrops("val", num_crops=16, seed=1)
    c = PhotoCrops("val", num_crops=16, seed=2)
    assert torch.equal(a.images_uint8, b.images_uint8)
    assert not torch.equal(a.images_uint8, c.images_uint8)


def test_split_by_photograph() -> None:
    train, val = PhotoCrops("train", num_crops=8), PhotoCrops("val", num_crops=8)
    assert set(val.photos) == set(VAL_PHOTOS)
    assert not set(train.photos) & set(val.photos)
    assert set(train.photos) | set(val.photos) == set(PHOTOS)


def test_other_image_size() -> None:
    assert PhotoCrops("val", image_size=64, num_crops=4)[0].shape == (3, 64, 64)


def test_registry_errors() -> None:
    assert len(build_dataset("photos", "val", image_size=32)) == 1024
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_dataset("mnist", "train")
    with pytest.raises(ValueError, match="split must be"):
        PhotoCrops("test")
