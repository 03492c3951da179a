"""Progress bars only on a terminal: a log file or CI gets the epoch lines, not bar updates."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import torch

from hrm_vision.train.callbacks import ProgressBar


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
