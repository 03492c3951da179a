"""Each bad input through the user-facing command line: the exit status and a message that names
the cause (the cases live in ``tests/helpers/bad_inputs.py``; ``python -m experiments.bad_inputs``
prints them as a table)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import bad_inputs  # tests/ is on sys.path (pytest prepend mode)

from hrm_vision.io import load, load_checkpoint

CASES = {case.name: case for case in bad_inputs.CASES}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared images and teacher of the tiny setup."""
    path = tmp_path_factory.mktemp("bad_inputs")
    bad_inputs.prepare(path, 2)
    return path


def run(name: str, base: Path, tmp_path: Path) -> str:
    case = CASES[name]
    code, text = bad_inputs.run_case(case, base, tmp_path)
    assert case.expect in text, text[-3000:]
    assert code == case.code, text[-3000:]
    return text


ERRORS = [c.name for c in bad_inputs.CASES if c.code == 2]


class TestErrorsNameTheCause:
    @pytest.mark.parametrize("name", ERRORS)
    def test_message_and_exit_status(self, name: str, base: Path, tmp_path: Path) -> None:
        text = run(name, base, tmp_path)
        assert "Traceback" not in text
        assert "weights_only` set to `False`" not in text  # never advise unsafe loading
        line = bad_inputs.message_line(text, CASES[name].expect)
        assert line.startswith("hrm-vision distill: error: ")

    def test_json_position_is_right(self, base: Path, tmp_path: Path) -> None:
        text = run("malformed JSON config", base, tmp_path)
        # line 2 is '  "batch_size": }': the value is missing at column 17, where '}' is
        assert "line 2, column 17" in text

    def test_pickled_object_never_runs(self, base: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
        text = run("checkpoint holding a pickled object", base, tmp_path)
        assert "this ran while loading" not in text + capsys.readouterr().out


class TestSkippedNotFatal:
    def test_undecodable_image_is_skipped_and_counted(self, base: Path, tmp_path: Path) -> None:
        text = run("an undecodable image among good ones", base, tmp_path)
        assert "broken.jpg" in text
        assert load(tmp_path / "ckpt" / "tinyvae_best.pth") is not None

    def test_sporadic_non_finite_losses_are_skipped_and_counted(self, base: Path,
                                                                tmp_path: Path) -> None:
        text = run("non-finite loss now and then", base, tmp_path)
        assert "(2 in a row)" not in text  # a good step in between resets the streak
        history = json.loads((tmp_path / "ckpt" / "history.json").read_text())
        assert [r["bad_steps"] for r in history] == [1, 2]  # calls 1 and 3: batch 1, then 3+0
        totals = [r["train"]["total"] for r in history]  # a NaN would be written as null
        assert all(isinstance(t, float) and math.isfinite(t) for t in totals), totals

    def test_diverging_loss_stops_and_keeps_last_good_checkpoint(self, base: Path,
                                                                 tmp_path: Path) -> None:
        text = run("non-finite loss every step from epoch 2", base, tmp_path)
        last = tmp_path / "ckpt" / "tinyvae_last.pth"
        assert str(last) in text
        payload = load_checkpoint(last)
        assert payload["epoch"] == 1 and payload["step_in_epoch"] == 0
        assert load(last) is not None


def non_finite_files(folder: Path) -> dict[str, list[str]]:
    """Every checkpoint in ``folder`` with the keys of its non-finite tensors (if any)."""
    from hrm_vision.io import non_finite_tensors

    return {p.name: non_finite_tensors(load_checkpoint(p)) for p in sorted(folder.glob("*.pth"))}


class TestDivergence:
    @pytest.mark.parametrize("lr, epochs", [pytest.param(30.0, 3, marks=pytest.mark.slow),
                                            (1e30, 2)])
    def test_a_diverging_run_stops_clearly_and_saves_only_finite_files(
            self, lr: float, epochs: int, base: Path, tmp_path: Path) -> None:
        """``--lr 30``: epoch 1 trains, then every step of epoch 2 is bad (an epoch without a
        good step). ``--lr 1e30``: the first step blows the weights up, validation is NaN.
        Both: status 1, one message naming what happened and the checkpoint left, every file
        written holds finite tensors only."""
        case = bad_inputs.Case(f"learning rate {lr:g}", lambda b, w: ["--lr", str(lr)],
                               "stopped.", code=1, epochs=epochs)
        code, text = bad_inputs.run_case(case, base, tmp_path)
        assert code == 1 and "Traceback" not in text, text[-3000:]
        line = bad_inputs.message_line(text, "stopped.")
        assert line.startswith("hrm-vision distill: error: ") and "(lower --lr" in line, line
        files = non_finite_files(tmp_path / "ckpt")
        assert all(not bad for bad in files.values()), files
        if lr == 30.0:
            assert "epoch 2 of the distill phase kept no optimizer step" in line
            assert "The last good checkpoint is" in line and files
            assert load_checkpoint(tmp_path / "ckpt" / "tinyvae_last.pth")["epoch"] == 1
        else:
            assert "validation after epoch 1 gave a non-finite loss" in line
            assert not files and "No checkpoint of this phase was written" in line


@pytest.fixture(scope="module")
def trained(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The ``tinyvae_last.pth`` payload of a one-epoch tiny run."""
    work = tmp_path_factory.mktemp("trained")
    code, text = bad_inputs.run_case(bad_inputs.Case("good", lambda b, w: [], "", code=0),
                                     base, work)
    assert code == 0, text[-3000:]
    return load_checkpoint(work / "ckpt" / "tinyvae_last.pth")


def _poison_optimizer(p: dict) -> None:
    state = next(iter(p["optimizer_state_dict"]["state"].values()))
    state["exp_avg_sq"] = state["exp_avg_sq"].clone().fill_(float("inf"))


def _nan_training_weights(p: dict) -> None:
    key = next(iter(p["train_state_dict"]))
    p["train_state_dict"][key] = p["train_state_dict"][key].clone().fill_(float("nan"))


#: (what is wrong, change to the payload, what the message says)
CRAFTED_RESUMES = [
    ("no rng_state", lambda p: p.pop("rng_state"),
     "is not a complete training checkpoint: it lacks rng_state"),
    ("no history", lambda p: p.pop("history"), "it lacks history"),
    ("an epoch that is a string", lambda p: p.update(epoch="3"),
     "epoch must be an integer >= 0, got str '3'"),
    ("a negative epoch", lambda p: p.update(epoch=-1), "epoch must be an integer >= 0, got int"),
    ("history that is not a list of records", lambda p: p.update(history=[1, 2]),
     "history must be a list of epoch records"),
    ("rng_state that is not one", lambda p: p.update(rng_state={"torch": "seed"}),
     "rng_state must be a dict whose 'torch' entry is a uint8 tensor"),
    ("an optimizer state of another shape",
     lambda p: p.update(optimizer_state_dict={"state": {}, "param_groups": []}),
     "optimizer_state_dict does not fit this run"),
    ("a string in the student's state dict",
     lambda p: p["student_state_dict"].update({"encoder.stem.weight": "w"}),
     "must map names to tensors; not a tensor: 'encoder.stem.weight' (str)"),
    ("NaN training weights", _nan_training_weights,
     "(train_state_dict) holds NaN or infinite weights"),
    ("infinite optimizer state", _poison_optimizer,
     "the optimizer state holds NaN or infinite values"),
    ("a newer format", lambda p: p.update(format_version=7),
     "has checkpoint format_version 7, newer than the version 1"),
]


class TestCraftedResume:
    @pytest.mark.parametrize("change, expect", [c[1:] for c in CRAFTED_RESUMES],
                             ids=[c[0] for c in CRAFTED_RESUMES])
    def test_named_error_not_a_traceback(self, change, expect: str, trained: dict, base: Path,
                                         tmp_path: Path) -> None:
        import copy

        payload = copy.deepcopy(trained)
        change(payload)
        torch.save(payload, tmp_path / "resume.pth")
        case = bad_inputs.Case("crafted", lambda b, w: ["--resume", str(w / "resume.pth")],
                               expect)
        code, text = bad_inputs.run_case(case, base, tmp_path)
        assert code == 2 and "Traceback" not in text, text[-3000:]
        line = bad_inputs.message_line(text, expect)
        assert line.startswith("hrm-vision distill: error: ") and expect in line, text[-3000:]
        assert str(tmp_path / "resume.pth") in line


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class TestRefusedBeforeWriting:
    """A run refused on its inputs leaves the checkpoint folder byte for byte as it was."""

    def test_a_finished_folder_is_left_as_it_was(self, base: Path, tmp_path: Path) -> None:
        good = bad_inputs.Case("good", lambda b, w: [], "", code=0)
        code, text = bad_inputs.run_case(good, base, tmp_path)
        assert code == 0, text[-3000:]
        before = _snapshot(tmp_path / "ckpt")
        assert "config.json" in before and "tinyvae_best.pth" in before
        refused = bad_inputs.Case("missing teacher", lambda b, w: [
            "--teacher-epochs", "0", "--teacher-checkpoint", str(w / "nonexistent.pth")],
            "nonexistent.pth")
        code, text = bad_inputs.run_case(refused, base, tmp_path)
        assert code == 2 and "nonexistent.pth" in text, text[-3000:]
        assert _snapshot(tmp_path / "ckpt") == before

    def test_a_corrupt_resume_is_named_before_the_dataset(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> None:
        """The default dataset (CIFAR-10 under ./data) is not there: the checkpoint is named."""
        from helpers.tiny_run import distill

        monkeypatch.chdir(tmp_path)
        (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
        code = distill(["--resume", "corrupt.pth", "--checkpoint-dir", "ckpt", "--device",
                        "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and "corrupt.pth" in err and "CIFAR" not in err, err
