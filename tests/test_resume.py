"""Resume: SIGKILL at random moments, SIGINT/SIGTERM save-and-exit, exact resume, interrupted saves
never replace the good checkpoint; --resume PATH continues the checkpoint's own phase with its
own models and teacher, in any folder, and checks the config."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import kill_resume, tiny_run  # tests/ is on sys.path (pytest prepend mode)

import hrm_vision.train.trainer as trainer
from hrm_vision.io import CheckpointError, load, load_checkpoint, save_checkpoint
from hrm_vision.train.callbacks import Callback
from hrm_vision.train.config import DistillConfig
from hrm_vision.train.trainer import (
    RESUME_MAY_CHANGE,
    Distiller,
    DistillPhase,
    FinetunePhase,
    TrainingInterrupted,
    config_differences,
)

EPOCHS = 3


def tiny_config(workdir: Path, epochs: int = EPOCHS, **flags):
    return tiny_run.config(tiny_run.prepare(workdir, epochs, **flags))


class SignalAt(Callback):
    """Sends ``signum`` to this process after batch ``step`` of epoch ``epoch`` (0-based) of
    ``phase``."""

    def __init__(self, signum: int, epoch: int, step: int, phase: str = "distill") -> None:
        self.signum, self.epoch, self.step, self.phase = signum, epoch, step, phase

    def on_batch_end(self, trainer, phase, step, terms) -> None:
        if phase.name == self.phase and trainer.current_epoch == self.epoch and step == self.step:
            os.kill(os.getpid(), self.signum)


class TestSignals:
    @pytest.mark.parametrize("crops", ["fixed", "stream"])
    def test_sigint_saves_mid_epoch_and_resume_is_exact_with_a_worker(
            self, tmp_path: Path, crops: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Interrupted and resumed with a DataLoader worker process, the run ends bit-identical
        to an uninterrupted one (which loads in-process: workers change nothing), also when
        the crops stream from the photographs (the resumed epoch draws the same crops)."""
        # the models' start and likelihood scale from 64 streamed crops (not 4,096), validation
        # on 16 (not the whole held-out set): the same for every run here, a tenth of the time
        monkeypatch.setattr(trainer, "INIT_IMAGES", 64)
        data = {} if crops == "fixed" else {"dataset": "photos", "crops": "stream",
                                            "val_samples": 16}
        config = tiny_config(tmp_path, epochs=1, num_workers=1, train_samples=24, **data)
        assert config.num_workers == 1
        reference = tiny_config(tmp_path, epochs=1, num_workers=0, train_samples=24,
                                checkpoint_dir=tmp_path / "reference", **data)
        Distiller(reference, console=False).run()

        before = signal.getsignal(signal.SIGINT)
        with pytest.raises(TrainingInterrupted, match="stopped by SIGINT .*--resume auto") as info:
            Distiller(config, callbacks=[SignalAt(signal.SIGINT, epoch=0, step=1)],
                      console=False).run()
        saved = load_checkpoint(info.value.checkpoint)
        assert (saved["epoch"], saved["step_in_epoch"]) == (0, 2)  # mid-epoch, after the step
        assert signal.getsignal(signal.SIGINT) is before  # the trainer's handler is gone

        Distiller(config, console=False).run(resume="auto")
        ckpt = Path(config.checkpoint_dir)
        resumed = load_checkpoint(ckpt / "tinyvae_last.pth")
        ref = load_checkpoint(tmp_path / "reference" / "tinyvae_last.pth")
        assert [r["epoch"] for r in resumed["history"]] == [1]
        assert resumed["global_step"] == ref["global_step"] == 3
        for key in ("student_state_dict", "adapter_state_dict"):
            for name, value in ref[key].items():
                assert torch.equal(resumed[key][name], value), f"{key}[{name}] differs"


    def test_sigterm_mid_finetune_keeps_the_distilled_best(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Fine-tuning epochs that report 20 dB less than they measure never beat the
        distillation epoch. Stopped in the middle of the second fine-tuning epoch and resumed,
        the run still compares that epoch with the distilled best (the resumed loop does not
        start a new best), and ends with the uninterrupted run's ``tinyvae_best.pth``."""
        def worse(self: FinetunePhase) -> dict[str, float]:
            values = DistillPhase.validate(self)
            return {**values, "psnr": values["psnr"] - 20.0}

        monkeypatch.setattr(FinetunePhase, "validate", worse)
        flags = {"epochs": 1, "finetune_epochs": 2, "train_samples": 24}
        config = tiny_config(tmp_path, **flags)
        reference = tiny_config(tmp_path, checkpoint_dir=tmp_path / "reference", **flags)
        Distiller(reference, console=False).run()

        with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM"):
            Distiller(config, callbacks=[SignalAt(signal.SIGTERM, epoch=1, step=1,
                                                  phase="finetune")], console=False).run()
        saved = load_checkpoint(Path(config.checkpoint_dir) / "tinyvae_finetune_last.pth")
        assert (saved["phase"], saved["epoch"], saved["step_in_epoch"]) == ("finetune", 1, 2)
        Distiller(config, console=False).run(resume="auto")

        got = Path(config.checkpoint_dir)
        ref = tmp_path / "reference"
        history = [(r["phase"], r["epoch"], r["is_best"]) for r in load_checkpoint(
            got / "tinyvae_finetune_last.pth")["history"]]
        assert history == [("distill", 1, True), ("finetune", 1, False),
                           ("finetune", 2, False)]
        best, ref_best = (load_checkpoint(d / "tinyvae_best.pth") for d in (got, ref))
        assert (best["phase"], best["epoch"]) == ("distill", 1)
        for key in ("phase", "epoch", "best_psnr", "global_step"):
            assert best[key] == ref_best[key], key
        for key in ("student_state_dict", "adapter_state_dict"):
            for name, value in ref_best[key].items():
                assert torch.equal(best[key][name], value), f"{key}[{name}]"
        last, ref_last = (load_checkpoint(d / "tinyvae_finetune_last.pth") for d in (got, ref))
        for name, value in ref_last["student_state_dict"].items():
            assert torch.equal(last["student_state_dict"][name], value), name


class TestKillAndResume:
    @pytest.mark.slow
    def test_sigkill_then_resume_keeps_every_epoch_once(self, tmp_path: Path) -> None:
        summary = kill_resume.run(tmp_path, kills=1, epochs=EPOCHS, seed=1, compare=False)
        rounds = summary["rounds"]
        assert "killed_after_s" in rounds[0] and rounds[-1]["returncode"] == 0
        assert all(r["resumed_ok"] for r in rounds), rounds
        assert rounds[1]["resumed_from"] == rounds[0]["saved_after"] != (0, 0)
        assert summary["history_epochs"] == [1, 2, 3] and summary["checkpoint_history_complete"]
        assert kill_resume.passed(summary, kills=1)


#: Saves a good checkpoint, then stalls inside the next save after writing its first bytes and
#: says so: the parent kills it there, mid-write, every time.
STALLED_WRITER = """
import sys, torch
from hrm_vision.io import save_checkpoint
save_checkpoint({"counter": 1, "weights": torch.full((1000,), 1.0)}, sys.argv[1])

def stalled(obj, f, *args, **kwargs):
    f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
    f.flush()
    print("mid-write", flush=True)
    sys.stdin.read()  # until killed

torch.save = stalled
save_checkpoint({"counter": 2, "weights": torch.full((1000,), 2.0)}, sys.argv[1])
"""


class TestInterruptedSave:
    def test_failure_inside_save_keeps_the_good_file(self, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        path = tmp_path / "tinyvae_last.pth"
        save_checkpoint({"epoch": 3}, path)

        def broken_save(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt

        monkeypatch.setattr(torch, "save", broken_save)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint({"epoch": 4}, path)
        assert load_checkpoint(path)["epoch"] == 3
        assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind

    def test_sigkill_mid_write_keeps_the_previous_file(self, tmp_path: Path) -> None:
        path = tmp_path / "big.pth"
        proc = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=tiny_run.REPO)
        try:
            assert proc.stdout.readline().strip() == "mid-write"
        finally:
            proc.kill()
            proc.wait()
        payload = load_checkpoint(path)
        assert payload["counter"] == 1 and torch.all(payload["weights"] == 1.0)
        stray = [p for p in tmp_path.iterdir() if p != path]
        assert len(stray) == 1 and stray[0].name.startswith(".big.pth.")  # the killed write
        assert stray[0].read_bytes().startswith(b"PK\x03\x04 the first bytes")

    def test_truncated_checkpoint_is_refused_by_name(self, tmp_path: Path) -> None:
        path = tmp_path / "ckpt.pth"
        save_checkpoint({"weights": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            load(path)


class TestStaleTemporaries:
    def test_a_run_removes_the_temporaries_of_killed_writes_only(self, tmp_path: Path) -> None:
        """A SIGKILL inside a write leaves ``.{name}.XXXXXXXX.tmp``; the next run deletes those
        and nothing else."""
        config = tiny_config(tmp_path, epochs=0)
        ckpt = Path(config.checkpoint_dir)
        ckpt.mkdir(parents=True)
        stale = [ckpt / ".tinyvae_last.pth.k2j_9x0a.tmp", ckpt / ".history.json.abcdefgh.tmp",
                 ckpt / ".config.json.00000000.tmp"]
        kept = [ckpt / "notes.tmp", ckpt / ".hidden.tmp", ckpt / "my.pth.abcdefgh.tmp"]
        for path in stale + kept:
            path.write_bytes(b"PK\x03\x04 half")
        Distiller(config, console=False).run()
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in kept)


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
    from hrm_vision.io import FolderLock

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
