"""cifar10 and imagefolder datasets on files made in the test (nothing is downloaded)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hrm_vision.data import build_dataset
from hrm_vision.data.cifar10 import BATCH_DIR, TRAIN_FILES, CIFAR10Images
from hrm_vision.data.imagefolder import ImageFolderImages, split_files

PER_BATCH = 4


def write_fake_cifar(root: Path, protocol: int = 2) -> dict[str, np.ndarray]:
    """A tiny CIFAR-10 in torchvision's on-disk format: 4 images per batch file."""
    folder = root / BATCH_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in (*TRAIN_FILES, "test_batch"):
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        entry = {"batch_label": name, "labels": [1] * PER_BATCH, "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(PER_BATCH)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
        written[name] = data
    meta = {"label_names": ["airplane"] * 10, "num_cases_per_batch": PER_BATCH}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return written


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class TestCifar10:
    @pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
    def test_reads_torchvision_layout(self, tmp_path: Path, protocol: int) -> None:
        written = write_fake_cifar(tmp_path, protocol)
        train = build_dataset("cifar10", "train", data_dir=str(tmp_path))
        val = build_dataset("cifar10", "val", data_dir=str(tmp_path))
        assert len(train) == 5 * PER_BATCH and len(val) == PER_BATCH
        x = val[1]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1
        # CIFAR rows are R plane, G plane, B plane of 32x32 (channel-first).
        expected = written["test_batch"][1].reshape(3, 32, 32) / 255.0
        assert torch.allclose(x, torch.from_numpy(expected).float())
        assert torch.equal(train[PER_BATCH], train[PER_BATCH])  # deterministic per index
        assert torch.allclose(train[PER_BATCH] * 255,
                              torch.from_numpy(written["data_batch_2"][0].reshape(3, 32, 32))
                              .float())

    def test_resized(self, tmp_path: Path) -> None:
        write_fake_cifar(tmp_path)
        x = CIFAR10Images("val", data_dir=tmp_path, image_size=16)[0]
        assert x.shape == (3, 16, 16) and 0 <= x.min() and x.max() <= 1

    def test_missing_files_say_both_ways_out(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError) as info:
            build_dataset("cifar10", "train", data_dir=str(tmp_path))
        msg = str(info.value)
        assert "\n" not in msg and "CIFAR-10 not found" in msg
        assert "--download" in msg and "--data-dir" in msg and str(tmp_path) in msg

    def test_truncated_batch_is_a_clear_error(self, tmp_path: Path) -> None:
        write_fake_cifar(tmp_path)
        path = tmp_path / BATCH_DIR / "test_batch"
        path.write_bytes(path.read_bytes()[:500])
        with pytest.raises(ValueError, match="test_batch is not a readable CIFAR-10 batch"):
            CIFAR10Images("val", data_dir=tmp_path)

    def test_pickled_object_is_refused(self, tmp_path: Path) -> None:
        write_fake_cifar(tmp_path)
        (tmp_path / BATCH_DIR / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
        with pytest.raises(ValueError, match="refused to unpickle .*system"):
            CIFAR10Images("val", data_dir=tmp_path)

    def test_wrong_shape_is_a_clear_error(self, tmp_path: Path) -> None:
        write_fake_cifar(tmp_path)
        bad = {"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 0]}
        (tmp_path / BATCH_DIR / "test_batch").write_bytes(pickle.dumps(bad))
        with pytest.raises(ValueError, match=r"not a CIFAR-10 batch: data has shape \(2, 100\)"):
            CIFAR10Images("val", data_dir=tmp_path)

    def test_bad_split(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="split must be"):
            CIFAR10Images("test", data_dir=tmp_path)


def write_images(root: Path, n: int, size: tuple[int, int] = (40, 24)) -> list[str]:
    """``n`` distinct images in mixed formats and sub-folders; returns relative paths."""
    rng = np.random.default_rng(1)
    rels = []
    for i in range(n):
        ext, mode = [(".png", "RGB"), (".jpg", "RGB"), (".PNG", "L"), (".bmp", "RGB"),
                     (".png", "RGBA")][i % 5]
        rel = f"sub{i % 3}/deeper/img{i}{ext}" if i % 2 else f"img{i}{ext}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode).save(root / rel)
        rels.append(rel)
    return rels


class TestImageFolder:
    def test_recursive_formats_shape_range(self, tmp_path: Path) -> None:
        rels = write_images(tmp_path, 20)
        (tmp_path / "notes.txt").write_text("not an image")
        (tmp_path / ".hidden").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "x.png")
        train = build_dataset("imagefolder", "train", data_dir=str(tmp_path), image_size=16)
        val = build_dataset("imagefolder", "val", data_dir=str(tmp_path), image_size=16)
        assert sorted(train.files + val.files) == sorted(rels)
        assert not set(train.files) & set(val.files) and len(val) >= 1
        x = train[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.05
        assert torch.equal(train[3], train[3])

    def test_split_deterministic_stable_and_seeded(self, tmp_path: Path) -> None:
        files = [f"dir/{i}.png" for i in range(200)]
        a = split_files(files, 0.1, seed=0)
        reordered = split_files(list(reversed(files)), 0.1, seed=0)
        assert sorted(a["val"]) == sorted(reordered["val"])  # listing order does not matter
        assert 5 <= len(a["val"]) <= 40
        more = split_files(files + [f"new/{i}.png" for i in range(50)], 0.1, seed=0)
        assert set(a["val"]) <= set(more["val"])  # adding files keeps old assignments
        assert a["val"] != split_files(files, 0.1, seed=1)["val"]
        two = split_files(["a.png", "b.png"], 0.1, seed=0)
        assert len(two["train"]) == len(two["val"]) == 1

    def test_center_crop_keeps_the_middle(self, tmp_path: Path) -> None:
        arr = np.zeros((16, 48, 3), dtype=np.uint8)
        arr[:, 16:32] = 255  # white middle third of a wide image
        Image.fromarray(arr).save(tmp_path / "wide.png")
        Image.fromarray(arr).save(tmp_path / "wide2.png")
        ds = ImageFolderImages(tmp_path, "train", image_size=16, val_fraction=0.0)
        assert ds[0].min() > 0.9  # the crop is the white square, the black sides are cut

    def test_corrupt_file_skipped_counted_logged(self, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
        write_images(tmp_path, 6)
        (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
        good = tmp_path / "img0.png"
        (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
        with caplog.at_level(logging.WARNING, logger="hrm_vision.data.imagefolder"):
            ds = ImageFolderImages(tmp_path, "train", image_size=8, val_fraction=0.0)
        assert len(ds) == 6 and sorted(r for r, _ in ds.skipped) == ["broken.jpg",
                                                                     "truncated.png"]
        assert "skipped 2 unreadable file(s) of 8" in caplog.text and str(tmp_path) in caplog.text

    def test_no_readable_images_names_the_folder(self, tmp_path: Path) -> None:
        (tmp_path / "a.jpg").write_bytes(b"garbage")
        (tmp_path / "b.png").write_bytes(b"")
        with pytest.raises(ValueError, match=f"no readable images .* in {tmp_path}: the 2 image "
                           r"file\(s\) of this split \(of 2 in the folder\) could not be decoded"):
            ImageFolderImages(tmp_path, "train", val_fraction=0.0)

    def test_empty_and_missing_folders(self, tmp_path: Path) -> None:
        (tmp_path / "readme.txt").write_text("hi")
        with pytest.raises(ValueError, match=f"no image files .* under {tmp_path}"):
            build_dataset("imagefolder", "train", data_dir=str(tmp_path))
        with pytest.raises(ValueError, match="image folder not found: .*nope"):
            build_dataset("imagefolder", "train", data_dir=str(tmp_path / "nope"))
