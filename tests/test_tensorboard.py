"""``--tensorboard``: TensorBoard event files under ``checkpoint_dir/tensorboard/`` with the
values of ``history.json`` and the reconstruction grid of the PNG pictures; off, no folder; the
extra missing, a one-line error before anything trains."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_run  # tests/ is on sys.path (pytest prepend mode)
from PIL import Image

from hrm_vision._extras import MissingExtraError
from hrm_vision import cli
from hrm_vision.train.config import build_parser, config_from_args
from hrm_vision.train.trainer import Distiller

EPOCHS = 2


def argv(workdir: Path, ckpt: str, *extra: str) -> list[str]:
    return [*tiny_run.prepare(workdir, EPOCHS, train_samples=16, checkpoint_dir=workdir / ckpt),
            *extra]


def test_event_files_hold_the_history_values_and_the_grid(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = config_from_args(build_parser("hrm-vision distill").parse_args(argv(tmp_path, "on", "--tensorboard")))
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
    config = config_from_args(build_parser("hrm-vision distill").parse_args(argv(tmp_path, "off")))
    assert not config.tensorboard
    Distiller(config, console=False).run()
    out = Path(config.checkpoint_dir)
    assert (out / "history.json").is_file()
    assert not (out / "tensorboard").exists()


def test_missing_extra_is_one_line_before_training(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    config = config_from_args(build_parser("hrm-vision distill").parse_args(argv(tmp_path, "missing",
                                                           "--tensorboard")))
    with pytest.raises(MissingExtraError, match=r"pip install 'hrm-vision\[tensorboard\]'"):
        Distiller(config, console=False)
    assert cli.main(["distill", *argv(tmp_path, "missing", "--tensorboard")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hrm-vision[tensorboard]" in err, err
    assert not (tmp_path / "missing").exists()  # nothing was started
