"""``--resume PATH`` continues the checkpoint's own phase with its own models, in any folder.

The original run pre-trains its teacher (one epoch) and distils for two epochs in ``a/``. Resumed
from ``a/tinyvae_last.pth`` into a new folder, the distillation continues with ``a/teacher.pth``
(no new teacher is pre-trained) and the new folder ends with ``tinyvae_best.pth`` even when no
resumed epoch beats the best (it comes along from ``a/``). A config that differs from the
checkpoint's in a field that shapes the run is refused, naming each field, unless
``--force-resume``; ``--epochs`` at or below the resumed epoch says there is nothing to do and
exits with 0.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import tiny_run  # tests/ is on sys.path (pytest prepend mode)

from hrm_vision.checkpoints import load_checkpoint, save_checkpoint
from hrm_vision.train.config import DistillConfig
from hrm_vision.train.trainer import RESUME_MAY_CHANGE, DistillPhase, config_differences

main = tiny_run.distill

#: The original run: its own teacher pre-trained for one epoch, two distillation epochs.
ORIGINAL = {"teacher_checkpoint": "none", "teacher_epochs": 1, "train_samples": 16}


def argv(work: Path, ckpt: Path, epochs: int = 2, **flags: object) -> list[str]:
    return tiny_run.prepare(work, epochs, checkpoint_dir=ckpt, **{**ORIGINAL, **flags})


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workdir; ``a/`` holds the original run's files."""
    work = tmp_path_factory.mktemp("resume_semantics")
    assert main(argv(work, work / "a")) == 0
    assert (work / "a" / "teacher.pth").is_file()
    return work


@pytest.fixture
def worse_resumed_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Distillation epochs report 20 dB less than they measure: none beats an earlier best."""
    validate = DistillPhase.validate
    monkeypatch.setattr(DistillPhase, "validate",
                        lambda self: {**(v := validate(self)), "psnr": v["psnr"] - 20.0})


def test_distill_checkpoint_continues_in_a_new_folder_with_its_teacher(
        original: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        worse_resumed_epochs: None) -> None:
    a, b = original / "a", tmp_path / "b"
    code, out = run([*argv(original, b, epochs=3, save_interval=1, log_interval=7),
                     "--resume", str(a / "tinyvae_last.pth")], capsys)
    assert code == 0, out[-3000:]
    assert f"teacher: loaded {a / 'teacher.pth'}" in out and "pre-training" not in out, out
    assert not (b / "teacher.pth").exists() and not (b / "teacher_last.pth").exists()
    last = load_checkpoint(b / "tinyvae_last.pth")
    assert (last["phase"], last["epoch"]) == ("distill", 3)
    assert last["teacher_source"] == str(a / "teacher.pth")
    assert [(r["phase"], r["epoch"]) for r in last["history"]] == [
        ("teacher", 1), ("distill", 1), ("distill", 2), ("distill", 3)]
    # epoch 3 (20 dB worse) is not the best: the original best came along, byte for byte
    assert (b / "tinyvae_best.pth").read_bytes() == (a / "tinyvae_best.pth").read_bytes()
    assert load_checkpoint(b / "tinyvae_best.pth")["best_psnr"] == last["best_psnr"]


def test_teacher_phase_checkpoint_continues_its_phase_in_a_new_folder(
        original: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The teacher phase is complete: its best comes along, ``teacher.pth`` is written from
    it in the new folder and the distillation runs there."""
    a, e = original / "a", tmp_path / "e"
    code, out = run([*argv(original, e), "--resume", str(a / "teacher_last.pth")], capsys)
    assert code == 0, out[-3000:]
    assert "--teacher-epochs 1 asks for nothing more of it: going on with the distill" in out
    assert (e / "teacher_best.pth").read_bytes() == (a / "teacher_best.pth").read_bytes()
    assert {"teacher.pth", "tinyvae_best.pth", "tinyvae_last.pth"} <= {
        p.name for p in e.iterdir()}
    assert load_checkpoint(e / "tinyvae_last.pth")["teacher_source"] == str(e / "teacher.pth")


def test_missing_teacher_is_named(original: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    payload = load_checkpoint(original / "a" / "tinyvae_last.pth")
    gone = tmp_path / "gone" / "teacher.pth"
    save_checkpoint({**payload, "teacher_source": str(gone)}, tmp_path / "x" / "last.pth")
    code, out = run([*argv(original, tmp_path / "c"), "--resume",
                     str(tmp_path / "x" / "last.pth")], capsys)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert (f"x/last.pth: its distill phase was trained with the teacher {gone}, which is not "
            "there: put that file back") in out, out
    assert "pre-training" not in out


def test_a_moved_folder_finds_its_own_teacher(original: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """The run's own ``teacher.pth`` travels with its folder."""
    old = tmp_path / "old"  # where the run was; moved to ``moved``
    moved = tmp_path / "moved"
    shutil.copytree(original / "a", moved)
    payload = load_checkpoint(moved / "tinyvae_last.pth")
    payload["config"] = {**payload["config"], "checkpoint_dir": str(old)}
    save_checkpoint({**payload, "teacher_source": str(old / "teacher.pth")},
                    moved / "tinyvae_last.pth")
    code, out = run([*argv(original, moved, epochs=3), "--resume", "auto"], capsys)
    assert code == 0, out[-3000:]
    assert f"teacher: loaded {moved / 'teacher.pth'}" in out, out


def test_a_config_that_shapes_the_run_differently_is_refused(
        original: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    c = tmp_path / "c"
    resume = ["--resume", str(original / "a" / "tinyvae_last.pth")]
    code, out = run([*argv(original, c, epochs=3, batch_size=4, student_base_channels=16),
                     *resume], capsys)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert ("was trained with another config: student_base_channels: checkpoint 8, now 16; "
            "batch_size: checkpoint 8, now 4 (resume with the checkpoint's values, or pass "
            "--force-resume") in out, out
    assert not list(c.glob("*.pth")) and not (c / "config.json").exists()

    code, out = run([*argv(original, c, epochs=3, batch_size=4), *resume,
                     "--force-resume"], capsys)
    assert code == 0, out[-3000:]
    assert "--force-resume: resuming" in out and "batch_size: checkpoint 8, now 4" in out
    assert load_checkpoint(c / "tinyvae_last.pth")["epoch"] == 3


def test_the_fields_that_may_change_are_config_fields() -> None:
    """One list, of real fields; everything else is compared (a changed learning rate is)."""
    assert RESUME_MAY_CHANGE <= set(DistillConfig.model_fields)
    stored = DistillConfig().model_dump()
    changed = DistillConfig(epochs=7, device="cpu", num_workers=3, learning_rate=1e-3,
                            checkpoint_dir="elsewhere")
    assert config_differences(stored, changed) == [
        "learning_rate: checkpoint 0.0003, now 0.001"]
    assert config_differences({}, DistillConfig()) == []  # absent fields: their defaults


@pytest.mark.parametrize("epochs", [1, 2])
def test_epochs_at_or_below_the_resumed_epoch_is_nothing_to_do(
        original: Path, tmp_path: Path, capsys: pytest.CaptureFixture, epochs: int) -> None:
    a, d = original / "a", tmp_path / "d"
    last = (a / "tinyvae_last.pth").read_bytes()
    code, out = run([*argv(original, d, epochs=epochs), "--resume",
                     str(a / "tinyvae_last.pth")], capsys)
    assert code == 0, out[-3000:]
    assert (f"tinyvae_last.pth is at epoch 2 of the distill phase; --epochs {epochs} asks for "
            "nothing more: nothing to do") in out, out
    assert (d / "tinyvae_best.pth").read_bytes() == (a / "tinyvae_best.pth").read_bytes()
    assert not (d / "tinyvae_last.pth").exists()  # nothing trained, nothing written
    assert (a / "tinyvae_last.pth").read_bytes() == last


def test_resume_auto_while_the_original_still_writes_is_refused(
        original: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The running original holds the folder's lock; a ``--resume auto`` into it reads and
    changes nothing."""
    from hrm_vision.files import FolderLock

    busy = tmp_path / "busy"
    shutil.copytree(original / "a", busy)
    before = {p.name: p.read_bytes() for p in busy.iterdir() if p.is_file()}
    with FolderLock(busy, "the original run"):
        code, out = run([*argv(original, busy, epochs=3), "--resume", "auto"], capsys)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert f"pid {os.getpid()}" in out, out
    after = {p.name: p.read_bytes() for p in busy.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_integer_weights_in_a_resumed_checkpoint_are_named(
        original: Path, tmp_path: Path, capsys: pytest.CaptureFixture, dtype: str) -> None:
    import torch

    payload = load_checkpoint(original / "a" / "tinyvae_last.pth")
    state = dict(payload["student_state_dict"])
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].to(getattr(torch, dtype))
    save_checkpoint({**payload, "student_state_dict": state}, tmp_path / "typed.pth")
    code, out = run([*argv(original, tmp_path / "c", epochs=3), "--resume",
                     str(tmp_path / "typed.pth")], capsys)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert "wrong dtypes" in out and f"{key}: checkpoint torch.{dtype}" in out, out
