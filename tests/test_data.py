"""The datasets: the offline photos (range, determinism, split by photograph), cifar10 and
imagefolder on files made in the test (nothing is downloaded), image bit depths and limits."""

from __future__ import annotations

import logging
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import hrm_vision.data as data
from hrm_vision.data import (
    BATCH_DIR,
    PHOTOS,
    TRAIN_FILES,
    VAL_PHOTOS,
    CIFAR10Images,
    CropStream,
    ImageFolderImages,
    PhotoCrops,
    UnsupportedImageError,
    build_dataset,
    load_square_uint8,
    read_image,
    split_files,
    unseen_crops,
)


# ---------------------------------------------------------------------- photos
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


# ---------------------------------------------------------------------- cifar10, folders, files
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
        with caplog.at_level(logging.WARNING, logger="hrm_vision.data"):
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


# ------------------------------------------------------------------------- bit depths
def write_png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte: ``values`` uint16 ``(H, W)`` gray or ``(H, W, 3)`` RGB
    (Pillow cannot write 16-bit RGB)."""
    arr = np.asarray(values, dtype=">u2")
    h, w = arr.shape[:2]
    color_type = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def write_float_rgb_tiff(path: Path, values: np.ndarray) -> Path:
    """An uncompressed 3-channel float32 TIFF (Pillow cannot write or read one)."""
    arr = np.ascontiguousarray(values, dtype="<f4")
    h, w, c = arr.shape
    data = arr.tobytes()
    tags_at, count = 8, 11
    bits_at = tags_at + 2 + count * 12 + 4
    formats_at, data_at = bits_at + 2 * c, bits_at + 4 * c
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, c, bits_at), (259, 3, 1, 1),
            (262, 3, 1, 2), (273, 4, 1, data_at), (277, 3, 1, c), (278, 4, 1, h),
            (279, 4, 1, len(data)), (284, 3, 1, 1), (339, 3, c, formats_at)]
    out = b"II*\x00" + struct.pack("<IH", tags_at, count)
    for tag, kind, n, value in tags:
        out += struct.pack("<HHIHH" if kind == 3 and n == 1 else "<HHII", tag, kind, n, value,
                           *([0] if kind == 3 and n == 1 else []))
    out += struct.pack("<I", 0) + struct.pack(f"<{c}H", *[32] * c) + struct.pack(f"<{c}H", *[3] * c)
    path.write_bytes(out + data)
    return path


def folder_items(root: Path, size: int = 8) -> dict[str, torch.Tensor]:
    ds = ImageFolderImages(root, "train", image_size=size, val_fraction=0.0)
    return {rel: ds[i] for i, rel in enumerate(ds.files)}


class TestBitDepths:
    """16-bit and float files are scaled by their depth, or skipped saying why."""

    def test_16bit_gray_png_is_scaled_not_saturated(self, tmp_path: Path) -> None:
        write_png16(tmp_path / "g.png", np.full((16, 16), 16384, np.uint16))
        gradient = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
        write_png16(tmp_path / "ramp.png", gradient)
        assert Image.open(tmp_path / "g.png").mode.startswith("I")  # the mode that saturated
        items = folder_items(tmp_path)
        assert torch.allclose(items["g.png"], torch.full((3, 8, 8), 16384 / 65535), atol=1 / 255)
        ramp = items["ramp.png"][0]
        assert ramp[:, 0].max() < 0.1 and ramp[:, -1].min() > 0.9  # the full range survives
        assert torch.all(ramp[:, 1:] >= ramp[:, :-1])

    def test_16bit_rgb_png_and_pgm(self, tmp_path: Path) -> None:
        rgb = np.zeros((8, 8, 3), np.uint16)
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 32768, 4096
        write_png16(tmp_path / "rgb.png", rgb)
        (tmp_path / "deep.pgm").write_bytes(b"P5\n8 8\n1023\n"
                                            + np.full((8, 8), 256, ">u2").tobytes())
        items = folder_items(tmp_path)
        assert torch.allclose(items["rgb.png"][:, 0, 0], torch.tensor([1.0, 0.5, 1 / 16]),
                              atol=1 / 255)
        assert torch.allclose(items["deep.pgm"], torch.full((3, 8, 8), 256 / 1023), atol=1 / 255)

    def test_float_tiff_in_unit_range_keeps_its_values(self, tmp_path: Path) -> None:
        Image.fromarray(np.full((16, 16), 0.25, np.float32)).save(tmp_path / "f.tif")
        assert Image.open(tmp_path / "f.tif").mode == "F"
        assert torch.allclose(folder_items(tmp_path)["f.tif"], torch.full((3, 8, 8), 0.25),
                              atol=1 / 255)

    def test_8bit_files_are_read_as_before(self, tmp_path: Path) -> None:
        rels = write_images(tmp_path, 5)
        items = folder_items(tmp_path, size=16)
        for rel in rels:  # Pillow's own uint8 path: convert, centre crop, Lanczos
            with Image.open(tmp_path / rel) as img:
                expected = ImageOps.fit(img.convert("RGB"), (16, 16),
                                        method=Image.Resampling.LANCZOS)
            assert torch.equal((items[rel] * 255).round().byte(),
                               torch.from_numpy(np.array(expected)).permute(2, 0, 1))

    def test_unknown_scales_are_skipped_saying_why(self, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
        Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "good.tif")
        Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(tmp_path / "a_range.tif")
        nan = np.full((8, 8), 0.5, np.float32)
        nan[0, 0] = np.nan
        Image.fromarray(nan).save(tmp_path / "b_nan.tif")
        Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "c_int32.tif")
        write_float_rgb_tiff(tmp_path / "d_rgb_float.tiff", np.full((8, 8, 3), 0.5))
        with caplog.at_level(logging.WARNING, logger="hrm_vision.data"):
            ds = ImageFolderImages(tmp_path, "train", image_size=8, val_fraction=0.0)
        assert ds.files == ["good.tif"]
        reasons = dict(ds.skipped)
        assert "outside [0, 1]" in reasons["a_range.tif"]
        assert "NaN" in reasons["b_nan.tif"]
        assert "32-bit integer" in reasons["c_int32.tif"]
        assert "multi-channel float TIFFs are not supported" in reasons["d_rgb_float.tiff"]
        assert "skipped 4 unreadable file(s) of 5" in caplog.text
        assert "outside [0, 1]" in caplog.text and "+1 more" in caplog.text


class TestReadImage:
    def test_float_rgb_by_depth(self, tmp_path: Path) -> None:
        write_png16(tmp_path / "g.png", np.full((4, 6), 65535 // 4, np.uint16))
        Image.fromarray(np.full((4, 6, 3), 51, np.uint8)).save(tmp_path / "e.png")
        Image.fromarray(np.full((4, 6), 0.75, np.float32)).save(tmp_path / "f.tif")
        for name, value in [("g.png", 0.25), ("e.png", 0.2), ("f.tif", 0.75)]:
            x = read_image(tmp_path / name)
            assert x.shape == (4, 6, 3) and x.dtype == np.float32
            assert np.allclose(x, value, atol=1e-4), name

    def test_errors(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            read_image(tmp_path / "missing.png")
        Image.fromarray(np.full((4, 4), -1.0, np.float32)).save(tmp_path / "neg.tif")
        with pytest.raises(UnsupportedImageError, match=r"neg.tif: float pixels in \[-1, -1\]"):
            read_image(tmp_path / "neg.tif")


class TestImageLimits:
    """Files refused before decoding: non-regular files and headers declaring too many pixels."""

    def test_pixel_limit_from_the_header(self, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
        Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
        assert read_image(tmp_path / "big.png", max_pixels=1200).shape == (30, 40, 3)
        with pytest.raises(UnsupportedImageError, match=r"40x30 = 1,200 pixels.*limit of 1,199"):
            read_image(tmp_path / "big.png", max_pixels=1199)
        monkeypatch.setenv("HRM_VISION_MAX_IMAGE_PIXELS", "1000")
        with pytest.raises(UnsupportedImageError, match="HRM_VISION_MAX_IMAGE_PIXELS"):
            read_image(tmp_path / "big.png")
        monkeypatch.setenv("HRM_VISION_MAX_IMAGE_PIXELS", "lots")
        with pytest.raises(ValueError, match="expected a positive integer"):
            read_image(tmp_path / "big.png")

    def test_a_bomb_is_refused_without_decoding(self, tmp_path: Path) -> None:
        # 13000 x 13000 of one colour compresses to a few hundred KB; decoding takes 500 MB.
        Image.new("L", (13000, 13000)).save(tmp_path / "bomb.png")
        with pytest.raises(UnsupportedImageError, match="169,000,000 pixels"):
            read_image(tmp_path / "bomb.png")

    @pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
    def test_fifo_is_refused_not_waited_on(self, tmp_path: Path) -> None:
        os.mkfifo(tmp_path / "camera.png")
        with pytest.raises(UnsupportedImageError, match="not a regular file"):
            read_image(tmp_path / "camera.png")


# ---------------------------------------------------------------------- crop streams
def gradient_photo(height: int, width: int) -> np.ndarray:
    """An (H, W, 3) uint8 image where every position has its own colour (no two crops alike)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 7) % 256],
                    axis=2).astype(np.uint8)


def test_pixel_std_is_numpys_std_of_uint8_pixels() -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    flat = np.full((64, 64, 3), 255, np.uint8)
    for view in (photo, photo[7:263:2, 11:267:3], photo[:1, :1], flat):
        assert data.pixel_std(view) == pytest.approx(view.std() / 255.0, rel=1e-12, abs=1e-15)


class TestCropStream:
    def test_deterministic_per_seed_epoch_and_index(self) -> None:
        photos = [gradient_photo(120, 160), gradient_photo(90, 200)]
        a, b = CropStream(photos, 16, 16, seed=5), CropStream(photos, 16, 16, seed=5)
        b.set_epoch(3)
        first = [a.crop(i) for i in range(16)]
        a.set_epoch(3)  # the order of the calls changes nothing: (seed, epoch, index) decides
        assert all(torch.equal(a[i], b[i]) for i in reversed(range(16)))
        assert all(torch.equal(a.crop(i, epoch=0), first[i]) for i in range(16))
        assert sum(torch.equal(a.crop(i), first[i]) for i in range(16)) == 0  # a fresh draw
        assert not torch.equal(CropStream(photos, 16, 16, seed=6).crop(0), first[0])
        assert a[0].dtype == torch.float32 and a[0].shape == (3, 16, 16)
        with pytest.raises(IndexError):
            a.crop(16)

    def test_photo_names_the_photograph_a_crop_is_cut_from(self) -> None:
        photos = [np.full((40, 40, 3), 60 * k, np.uint8) for k in range(4)]  # one grey each
        stream = CropStream(photos, 32, 16, seed=2)
        for epoch in (0, 3):
            seen = [stream.photo(i, epoch) for i in range(32)]
            assert [int(stream.crop(i, epoch)[0, 0, 0]) // 60 for i in range(32)] == seen
            assert len(set(seen)) > 1

    def test_crops_of_a_large_photograph_spread_over_it_at_many_scales(self) -> None:
        """An imagefolder of large photographs is streamed at full size: crops from all over
        each photograph at scales 1/4 to 1, not one centre crop per file."""
        root = Path(self._folder(self._tmp))
        stream = build_dataset("imagefolder", "train", image_size=32, data_dir=root,
                               crops="stream", num_crops=64)
        assert isinstance(stream, CropStream)
        assert [p.shape for p in stream.photos] == [(600, 800, 3)]  # not reduced
        crops = torch.stack([stream.crop(i) for i in range(64)]).float()
        x_mean = crops[:, 0].mean((1, 2))  # red grows with x: where on the photograph
        y_mean = crops[:, 1].mean((1, 2))
        assert x_mean.min() < 60 and x_mean.max() > 190 and y_mean.min() < 60 \
            and y_mean.max() > 190
        centre = load_square_uint8(root / "train" / "big.png", 32)  # what fixed crops would be
        assert float(centre[..., 0].mean()) == pytest.approx(127, abs=3)
        assert len({tuple(c[:, 0, 0].tolist()) for c in crops}) > 48  # different places
        # a crop spanning more of the photograph (a smaller scale) has more red (x) values
        spans = (crops[:, 0].amax((1, 2)) - crops[:, 0].amin((1, 2))).numpy()
        assert spans.min() < 14 and spans.max() > 25
        flipped = (crops[:, 0, :, 0] > crops[:, 0, :, -1]).any(1)  # red falls to the right
        assert 10 < int(flipped.sum()) < 54

    def test_crops_reduced_at_most_4x_are_plain_bilinear(self, monkeypatch) -> None:
        """The box-reduction shortcut leaves every crop of the default scales as the plain
        antialiased resize cuts it, and is taken for wider squares."""
        photo = gradient_photo(600, 800)
        photo[::7] = 255 - photo[::7]  # fine detail, so that two filters differ

        def crops(scales: tuple[float, float]) -> torch.Tensor:
            rng = np.random.default_rng(4)
            return torch.stack([data.random_crop(photo, 32, rng, scales) for _ in range(24)])

        shortcut = {s: crops(s) for s in (data.STREAM_SCALES, (0.05, 0.05))}
        monkeypatch.setattr(data, "REDUCING_GAP", 1e9)  # never: the plain resize, every pixel
        assert torch.equal(shortcut[data.STREAM_SCALES], crops(data.STREAM_SCALES))
        assert not torch.equal(shortcut[(0.05, 0.05)], crops((0.05, 0.05)))

    def test_wide_squares_are_cut_from_the_reduced_photograph(self) -> None:
        """A stream at scales under 1/4 cuts its wide squares from the photograph reduced by 2
        (the same places, nearly the same pixels); at the default scales it keeps the photograph
        alone and cuts exactly what :func:`random_crop` cuts from it."""
        photo = gradient_photo(600, 800)
        photo[::7] = 255 - photo[::7]
        default = CropStream([photo], 8, 32, seed=3)
        assert len(default.levels[0]) == 1
        assert all(torch.equal(default.crop(i), data.random_crop(
            photo, 32, default._draw(i, None)[0], default.scales)) for i in range(8))
        wide = CropStream([photo], 64, 32, seed=3, scales=(0.05, 0.2))
        levels = wide.levels[0]
        assert [lv.shape[:2] for lv in levels] == [(600, 800), (300, 400), (150, 200), (75, 100)]
        from_levels = torch.stack([wide.crop(i) for i in range(64)]).float()
        direct = torch.stack([data.random_crop(photo, 32, wide._draw(i, None)[0], wide.scales)
                              for i in range(64)]).float()
        changed = (from_levels - direct).abs().flatten(1).amax(1) > 0
        assert changed.float().mean() > 0.9  # squares of 160-640 px: all but the narrowest
        assert (from_levels - direct).pow(2).mean() < (from_levels - direct.roll(1, 0)).pow(
            2).mean() / 20  # the same crop, filtered a little differently

    def test_imagefolder_train_and_val_folders_are_the_split(self, tmp_path: Path) -> None:
        root = Path(self._folder(tmp_path))
        val = build_dataset("imagefolder", "val", image_size=32, data_dir=root, crops="stream",
                            num_crops=8)
        assert len(val) == 8 and not isinstance(val, CropStream)  # a fixed set
        assert torch.equal(val[3], build_dataset("imagefolder", "val", image_size=32,
                                                 data_dir=root, crops="stream", num_crops=8)[3])
        fixed = ImageFolderImages(root, "val", image_size=16)
        assert fixed.files == ["val/held.png"]

    def test_crop_scales_set_the_training_crops_only(self, tmp_path: Path) -> None:
        """Smaller scales cut wider squares of the photograph (more of its colours per crop);
        the validation crops keep the default scales whatever the training stream's are."""
        root = Path(self._folder(tmp_path))

        def spans(scales: tuple[float, float]) -> np.ndarray:
            stream = build_dataset("imagefolder", "train", image_size=32, data_dir=root,
                                   crops="stream", num_crops=32, crop_scales=scales)
            crops = torch.stack([stream.crop(i) for i in range(32)]).float()
            return (crops[:, 0].amax((1, 2)) - crops[:, 0].amin((1, 2))).numpy()

        wide, own = spans((0.1, 0.1)), spans((1.0, 1.0))  # 320-pixel squares / the pixels
        assert wide.min() > 2 * own.max()
        val = [build_dataset("imagefolder", "val", image_size=32, data_dir=root, crops="stream",
                             num_crops=8, crop_scales=s).images_uint8 for s in ((0.1, 0.1),
                                                                                (1.0, 1.0))]
        assert torch.equal(*val)

    def test_unseen_crops_take_every_photograph(self) -> None:
        crops = unseen_crops("photos", 2 * len(PHOTOS), 32, seed=1)
        assert crops.images_uint8.shape == (2 * len(PHOTOS), 3, 32, 32)
        with pytest.raises(ValueError, match="no photographs to stream"):
            build_dataset("cifar10", "train", crops="stream")

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self._tmp = tmp_path

    @staticmethod
    def _folder(root: Path) -> Path:
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "val").mkdir(exist_ok=True)
        Image.fromarray(gradient_photo(600, 800)).save(root / "train" / "big.png")
        Image.fromarray(gradient_photo(100, 90)).save(root / "val" / "held.png")
        return root
