"""The callbacks: progress bars only on a terminal; --tensorboard event files with the values of
history.json and the reconstruction grid (off: no folder; the extra missing: one line before
anything trains)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import tiny_run  # tests/ is on sys.path (pytest prepend mode)
from PIL import Image

from hrm_vision import cli
from hrm_vision._extras import MissingExtraError
from hrm_vision.train.callbacks import ProgressBar
from hrm_vision.train.trainer import Distiller


def test_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch) -> None:
    log = io.StringIO()  # a file, as under nohup or CI
    monkeypatch.setattr(sys, "stderr", log)
    bar = ProgressBar()
    bar.on_epoch_begin(None, SimpleNamespace(name="distill", epochs=2), 0, 10)
    for step in range(10):
        bar.on_batch_end(None, None, step, {"total": 1.0})
    assert bar.bar is not None and bar.bar.disable
    assert "it/s" not in log.getvalue()


def test_bar_is_on_for_a_terminal(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = ProgressBar()
    bar.on_epoch_begin(None, SimpleNamespace(name="distill", epochs=2), 0, 10)
    bar.on_batch_end(None, None, 0, {"total": 1.0})
    assert not bar.bar.disable
    bar.bar.close()
    assert "distill 1/2" in term.getvalue()


def test_reconstruction_grid_is_enlarged_and_labelled(tmp_path, photo_batch) -> None:
    from PIL import Image

    from hrm_vision.train.callbacks import save_grid
    from hrm_vision.train.trainer import error_image

    x = photo_batch[:4]
    rows = [("input", x), ("student", x.flip(-1)), ("error x4", error_image(x.flip(-1), x))]
    save_grid(rows, tmp_path / "grid.png", scale=4)
    image = Image.open(tmp_path / "grid.png")
    # 4 images of 32 px plus 1 px padding each side, enlarged 4x, and a label column
    assert image.width >= 4 * (4 * 33 + 1) and image.height == 4 * (3 * 33 + 1)
    label_column = image.crop((0, 0, 60, image.height)).convert("L")
    assert label_column.getextrema()[0] < 128  # the labels are drawn
    assert torch.equal(error_image(x, x), torch.zeros_like(x))


def test_picture_rows_are_computed_once_per_epoch() -> None:
    """The PNG and TensorBoard writers share one forward pass of the grid images per epoch."""
    from hrm_vision.train.trainer import Phase

    calls = []

    class Counting(Phase):
        def picture_rows(self):
            calls.append(1)
            return [("input", torch.full((1, 3, 8, 8), float(len(calls))))]

    phase = Counting(ctx=None, epochs=2)  # type: ignore[arg-type]
    first = phase.epoch_picture_rows(1)
    assert phase.epoch_picture_rows(1) is first and len(calls) == 1
    assert phase.epoch_picture_rows(2)[0][1].max() == 2.0 and len(calls) == 2


EPOCHS = 2


def argv(workdir: Path, ckpt: str, *extra: str) -> list[str]:
    return [*tiny_run.prepare(workdir, EPOCHS, train_samples=16, checkpoint_dir=workdir / ckpt),
            *extra]


def test_event_files_hold_the_history_values_and_the_grid(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_run.config(argv(tmp_path, "on", "--tensorboard"))
    assert config.tensorboard
    Distiller(config, console=False).run()
    out = Path(config.checkpoint_dir)
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    for record in history:
        assert set(record["value_share"]) >= {"recon", "kl"}  # each term's share, every epoch
        assert sum(record["gradient_share"].values()) == pytest.approx(1.0)
        for part in ("train", "val", "value_share", "gradient_share"):
            assert set(record[part]) >= {"recon"}
            for key in record[part]:
                assert f"distill/{part}/{key}" in tags["scalars"], (part, key)
    for tag, values in (("distill/val/psnr", [r["val"]["psnr"] for r in history]),
                        ("distill/train/total", [r["train"]["total"] for r in history]),
                        ("distill/lr", [r["lr"] for r in history]),
                        ("distill/gradient_share/recon",
                         [r["gradient_share"]["recon"] for r in history])):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2], tag
        # TensorBoard stores float32
        assert [s.value for s in scalars] == [float(np.float32(v)) for v in values], tag
    images = events.Images("distill/reconstructions")
    assert [i.step for i in images] == [1, 2]
    logged = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    saved = np.asarray(Image.open(out / "distill_epoch_002.png").convert("RGB"))
    assert logged.shape == saved.shape and np.array_equal(logged, saved)


def test_no_tensorboard_folder_without_the_option(tmp_path: Path) -> None:
    config = tiny_run.config(argv(tmp_path, "off"))
    assert not config.tensorboard
    Distiller(config, console=False).run()
    out = Path(config.checkpoint_dir)
    assert (out / "history.json").is_file()
    assert not (out / "tensorboard").exists()


def test_missing_extra_is_one_line_before_training(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    config = tiny_run.config(argv(tmp_path, "missing", "--tensorboard"))
    with pytest.raises(MissingExtraError, match=r"pip install 'hrm-vision\[tensorboard\]'"):
        Distiller(config, console=False)
    assert cli.main(["distill", *argv(tmp_path, "missing", "--tensorboard")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hrm-vision[tensorboard]" in err, err
    assert not (tmp_path / "missing").exists()  # nothing was started
