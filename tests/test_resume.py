"""Crash-safe resume: SIGKILL at random moments, SIGINT/SIGTERM save-and-exit, exact resume,
and saves that are interrupted never replace the good checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import kill_resume, tiny_run  # tests/ is on sys.path (pytest prepend mode)

from hrm_vision.checkpoints import CheckpointError, load_checkpoint, load_model, save_checkpoint
from hrm_vision.train.config import build_parser, config_from_args
from hrm_vision.train.callbacks import Callback
from hrm_vision.train.trainer import DistillPhase, FinetunePhase
from hrm_vision.train.trainer import Distiller, TrainingInterrupted

EPOCHS = 3


def tiny_config(workdir: Path, epochs: int = EPOCHS, **flags):
    return config_from_args(build_parser("hrm-vision distill").parse_args(tiny_run.prepare(workdir, epochs, **flags)))


class SignalAt(Callback):
    """Sends ``signum`` to this process after batch ``step`` of epoch ``epoch`` (0-based) of
    ``phase``."""

    def __init__(self, signum: int, epoch: int, step: int, phase: str = "distill") -> None:
        self.signum, self.epoch, self.step, self.phase = signum, epoch, step, phase

    def on_batch_end(self, trainer, phase, step, terms) -> None:
        if phase.name == self.phase and trainer.current_epoch == self.epoch and step == self.step:
            os.kill(os.getpid(), self.signum)


class TestSignals:
    def test_sigint_saves_mid_epoch_and_resume_is_exact_with_a_worker(self,
                                                                      tmp_path: Path) -> None:
        """Interrupted and resumed with a DataLoader worker process, the run ends bit-identical
        to an uninterrupted one (which loads in-process: workers change nothing)."""
        config = tiny_config(tmp_path, epochs=1, num_workers=1, train_samples=24)
        assert config.num_workers == 1
        reference = tiny_config(tmp_path, epochs=1, num_workers=0, train_samples=24,
                                checkpoint_dir=tmp_path / "reference")
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
from hrm_vision.checkpoints import save_checkpoint
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
            load_model(path)


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
