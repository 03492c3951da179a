"""Checkpoint files: atomic save, weights_only loading, clear errors, model rebuilding."""

from __future__ import annotations

import os
import pickle
from unittest import mock

import pytest
import torch

from hrm_vision.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_model,
    model_entry,
    save_checkpoint,
)
from hrm_vision.vae import MinimalVAE, TeacherVAE


def tiny() -> MinimalVAE:
    return MinimalVAE(latent_dim=8, base_channels=8)


class Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_roundtrip_rebuilds_model_with_same_outputs(tmp_path) -> None:
    model = tiny().eval()
    path = save_checkpoint({**model_entry(model, "student"), "epoch": 3}, tmp_path / "a.pth")
    payload = torch.load(path)  # default weights_only=True must work
    assert payload["epoch"] == 3 and payload["student_arch"]["name"] == "tinyvae"
    loaded = load_model(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
    assert not loaded.training


def test_missing_role_is_named(tmp_path) -> None:
    path = save_checkpoint(model_entry(tiny(), "student"), tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="no 'teacher' model.*student"):
        load_model(path, role="teacher")


def test_other_architecture_names_mismatched_shapes(tmp_path) -> None:
    payload = model_entry(tiny(), "student")
    payload["student_arch"]["latent_dim"] = 16  # claims another architecture
    path = save_checkpoint(payload, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*checkpoint \(16, .*model \(32"):
        load_model(path)


def test_not_a_checkpoint_and_truncated(tmp_path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(text)
    good = save_checkpoint(model_entry(tiny(), "student"), tmp_path / "good.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_pickled_object_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"student_state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)
    assert isinstance(pickle.loads(pickle.dumps(1)), int)


def test_interrupted_save_keeps_previous_file(tmp_path) -> None:
    path = save_checkpoint({"epoch": 1}, tmp_path / "last.pth")
    with mock.patch("torch.save", side_effect=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary left behind


def test_teacher_role(tmp_path) -> None:
    teacher = TeacherVAE(latent_dim=8, base_channels=8, blocks_per_stage=1)
    path = save_checkpoint(model_entry(teacher, "teacher"), tmp_path / "teacher.pth")
    assert isinstance(load_model(path, role="teacher"), TeacherVAE)
