"""Each kind of bad input to the distiller's command line, and a runner that records what the
user gets.

Every case runs ``hrm-vision distill`` (what ``training/distill_tinyvae.py`` runs) on
the tiny setup of :mod:`.tiny_run` with one thing broken, and records the exit status and all
that was printed. ``tests/test_bad_input.py`` asserts that each message names its cause;
``python -m experiments.bad_inputs`` prints the table.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from .tiny_run import prepare

#: Training images per case (3 batches of 8 per epoch): enough to show each behaviour.
TRAIN = 24


@dataclass(frozen=True)
class Case:
    """One bad input: ``make(base, work)`` returns extra CLI flags (``base`` holds the shared
    images and teacher, ``work`` is this case's own folder); ``expect`` must be in the message."""

    name: str
    make: Callable[[Path, Path], list[str]]
    expect: str
    code: int = 2
    nan_calls: Callable[[int], bool] | None = None  # which loss calls return NaN
    epochs: int = 1


def _config(text: str) -> Callable[[Path, Path], list[str]]:
    def make(base: Path, work: Path) -> list[str]:
        (work / "config.json").write_text(text)
        return ["--config", str(work / "config.json")]
    return make


def _file(flag: str, write: Callable[[Path, Path], None],
          name: str = "file.pth") -> Callable[[Path, Path], list[str]]:
    def make(base: Path, work: Path) -> list[str]:
        write(base, work / name)
        return [flag, str(work / name)]
    return make


def _truncated(base: Path, path: Path) -> None:
    data = (base / "teacher.pth").read_bytes()
    path.write_bytes(data[: len(data) // 2])


class Evil:
    def __reduce__(self) -> tuple:
        return (print, ("this ran while loading a checkpoint",))


def _pickled(base: Path, path: Path) -> None:
    torch.save({"teacher_state_dict": {}, "teacher_arch": {"name": "teacher"}, "x": Evil()}, path)


def _student_as_teacher(base: Path, path: Path) -> None:
    from hrm_vision.io import model_entry, save_checkpoint
    from hrm_vision.vae import MinimalVAE

    save_checkpoint(model_entry(MinimalVAE(8, 8), "student"), path)


def _other_teacher(base: Path, path: Path) -> None:
    from hrm_vision.io import model_entry, save_checkpoint
    from hrm_vision.vae import TeacherVAE

    save_checkpoint(model_entry(TeacherVAE(32, 8, 1), "teacher"), path)


def _other_arch_resume(base: Path, path: Path) -> None:
    """A distillation checkpoint of a run with twice the student width."""
    from hrm_vision.io import model_entry, save_checkpoint
    from hrm_vision.vae import LatentAdapter, MinimalVAE

    save_checkpoint({"phase": "distill", "epoch": 1, "step_in_epoch": 0, "history": [],
                     **model_entry(MinimalVAE(8, 16), "student"),
                     "adapter_state_dict": LatentAdapter(8, 16).state_dict(),
                     "adapter_arch": {"student_dim": 8, "teacher_dim": 16},
                     "optimizer_state_dict": {}}, path)


def _images(write: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def make(base: Path, work: Path) -> list[str]:
        folder = work / "images"
        folder.mkdir()
        write(folder)
        return ["--data-dir", str(folder)]
    return make


def _unreadable_only(folder: Path) -> None:
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "b.png").write_bytes(b"")


def _one_corrupt(base: Path, work: Path) -> list[str]:
    import shutil

    folder = work / "images"
    shutil.copytree(base / "images", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return ["--data-dir", str(folder)]


CASES: tuple[Case, ...] = (
    Case("malformed JSON config", _config('{"epochs": 2,\n  "batch_size": }\n'),
         "is not valid JSON: Expecting value at line 2, column 17"),
    Case("unknown config key", _config('{"epoch": 3}'), "unknown key 'epoch'"),
    Case("invalid value (negative weight)", _config('{"kl_weight": -1}'),
         "kl_weight: Input should be greater than or equal to 0"),
    Case("invalid value (wrong type)", _config('{"temperature": "hot"}'),
         "temperature: Input should be a valid number"),
    Case("invalid flag value (temperature 0)", lambda b, w: ["--temperature", "0"],
         "temperature: Input should be greater than 0"),
    Case("image size not a multiple of 8", lambda b, w: ["--image-size", "30"],
         "image_size must be a multiple of 8"),
    Case("CUDA requested on a machine without it", lambda b, w: ["--device", "cuda"],
         "CUDA is not available"),
    Case("--resume file that does not exist", lambda b, w: ["--resume", str(w / "nope.pth")],
         "checkpoint not found"),
    Case("corrupt checkpoint (random bytes)",
         _file("--resume", lambda b, p: p.write_bytes(bytes(range(256)) * 64)),
         "is not a readable PyTorch checkpoint (corrupt or truncated file?)"),
    Case("truncated checkpoint", _file("--teacher-checkpoint", _truncated),
         "is not a readable PyTorch checkpoint (corrupt or truncated file?)"),
    Case("not a checkpoint (a JSON file)",
         _file("--resume", lambda b, p: p.write_text('{"epochs": 3}'), "config.json"),
         "is not a readable PyTorch checkpoint"),
    Case("checkpoint holding a pickled object", _file("--teacher-checkpoint", _pickled),
         "holds pickled Python objects, which are refused"),
    Case("resume from another architecture", _file("--resume", _other_arch_resume),
         "shape mismatches: encoder"),
    Case("teacher checkpoint with another latent size", _file("--teacher-checkpoint",
                                                              _other_teacher),
         "teacher latent_dim 32 does not match teacher_latent_dim=16"),
    Case("student checkpoint given as the teacher", _file("--teacher-checkpoint",
                                                          _student_as_teacher),
         "has no 'teacher' model"),
    Case("a model file given to --resume",
         _file("--resume", lambda b, p: p.write_bytes((b / "teacher.pth").read_bytes())),
         "is not a training checkpoint of this trainer"),
    Case("image folder with no readable images", _images(_unreadable_only),
         "no readable images for the 'train' split in"),
    Case("missing dataset folder", lambda b, w: ["--data-dir", str(w / "nowhere")],
         "image folder not found"),
    Case("CIFAR-10 files missing", lambda b, w: ["--dataset", "cifar10", "--data-dir", str(w)],
         "CIFAR-10 not found in"),
    Case("an undecodable image among good ones", _one_corrupt,
         "skipped 1 unreadable file(s)", code=0),
    Case("non-finite loss now and then", lambda b, w: [], "non-finite loss at epoch 1 batch 1: "
         "step skipped (1 in a row)", code=0, nan_calls=lambda i: i in (1, 3), epochs=2),
    Case("non-finite loss every step from epoch 2", lambda b, w: ["--max-bad-steps", "3"],
         "the loss was non-finite 3 times in a row (epoch 2, batch 2); stopped. The last good "
         "checkpoint is", code=1, nan_calls=lambda i: i >= 3, epochs=2),
)


@contextlib.contextmanager
def nan_loss(calls: Callable[[int], bool] | None) -> Iterator[None]:
    """Make the distillation loss NaN on the training calls (counted from 0) where
    ``calls(i)`` is true; validation and the epoch's term shares are left alone."""
    if calls is None:
        yield
        return
    from hrm_vision.train.trainer import DistillPhase, PhaseLoop

    original, original_shares = DistillPhase.loss, PhaseLoop._term_shares
    counter = iter(range(10**9))
    in_shares = []  # the epoch's term shares are not a training step

    def loss(self, module, index, x):  # type: ignore[no-untyped-def]
        terms = original(self, module, index, x)
        if torch.is_grad_enabled() and not in_shares and calls(next(counter)):
            terms = {**terms, "total": terms["total"] * float("nan")}
        return terms

    def shares(self):  # type: ignore[no-untyped-def]
        in_shares.append(True)
        try:
            return original_shares(self)
        finally:
            in_shares.pop()

    with mock.patch.object(DistillPhase, "loss", loss), \
            mock.patch.object(PhaseLoop, "_term_shares", shares):
        yield


def run_case(case: Case, base: Path, work: Path) -> tuple[int, str]:
    """Run the CLI on ``case``; (exit status, everything written to stdout and stderr)."""
    from helpers.tiny_run import distill as main

    work.mkdir(parents=True, exist_ok=True)
    argv = [*prepare(base, case.epochs, checkpoint_dir=work / "ckpt", train_samples=TRAIN),
            *case.make(base, work)]
    out = io.StringIO()
    handler = _log_handler(out)
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out), nan_loss(
            case.nan_calls):
        try:
            code = main(argv)
        finally:
            _log_handler(None, handler)
    return code, out.getvalue()


def _log_handler(stream: io.StringIO | None, handler=None):  # type: ignore[no-untyped-def]
    """Send warnings (skipped images) to ``stream``; with ``stream`` None remove ``handler``."""
    import logging

    root = logging.getLogger("hrm_vision")
    if stream is None:
        root.removeHandler(handler)
        return None
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)
    return handler


def message_line(text: str, expect: str) -> str:
    """The line of ``text`` holding ``expect`` (else its last line), without progress bars."""
    lines = [ln.split("\r")[-1].strip() for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in lines if expect in ln), lines[-1] if lines else "")
