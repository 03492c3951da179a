"""One error path for the trainer, evaluation and export commands: each class of expected
failure (an unloadable checkpoint, a bad config or option value, a dataset problem, a full disk,
a missing extra) through each command is one line on standard error naming the file or field
and the cause, exit status 2, no traceback.

The commands run as the user runs them (``python training/distill_tinyvae.py``, ``python -m
...``) in child processes forked from interpreters that have imported torch (see
:data:`FORK_RUNNER`; two such interpreters take alternate cases at once), so the table stays
fast. A full disk is a file size limit
(``RLIMIT_FSIZE``): a write past it fails with ``EFBIG`` exactly where ``ENOSPC`` would.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from helpers import tiny_run  # tests/ is on sys.path (pytest prepend mode)
from helpers.forked import Outcome, command_runner, run_commands

from hrm_vision import cli
from hrm_vision.io import model_entry, save_checkpoint
from hrm_vision.vae import MinimalVAE

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "distill script": (["training/distill_tinyvae.py"], "distill_tinyvae.py: error: "),
    "distill module": (["-m", "hrm_vision", "distill"], "hrm-vision distill: error: "),
    "evaluation": (["-m", "hrm_vision", "evaluate"], "hrm-vision evaluate: error: "),
    "export": (["-m", "hrm_vision", "export"], "hrm-vision export: error: "),
}
#: File size limit of the full-disk cases: above config.json, history and pictures, below any
#: checkpoint, the weights the evaluation measures and the exported files.
FULL_DISK_BYTES = 256 * 1024


class Case(NamedTuple):
    """``args`` after the command (``{d}``: the case folder); ``expect``: in the one line."""

    command: str
    failure: str
    args: list[str]
    expect: str
    hide_skimage: bool = False
    file_size_limit: int | None = None


def distill(*extra: str) -> list[str]:
    """The flags of the tiny distillation run (tests/helpers/tiny_run.py: one epoch on the
    images and teacher under ``{d}``), then ``extra``."""
    t, s = tiny_run.TEACHER, tiny_run.STUDENT
    options = {"dataset": "imagefolder", "data-dir": "{d}/images", "image-size": 32,
               "teacher-checkpoint": "{d}/teacher.pth", "teacher-latent-dim": t["latent_dim"],
               "teacher-base-channels": t["base_channels"],
               "teacher-blocks-per-stage": t["blocks_per_stage"],
               "student-latent-dim": s["latent_dim"], "student-base-channels": s["base_channels"],
               "perceptual-backbone": "teacher", "batch-size": 8, "epochs": 1,
               "train-samples": 16, "warmup-steps": 2, "device": "cpu",
               "checkpoint-dir": "{d}/ckpt"}
    flags = [a for k, v in options.items() for a in (f"--{k}", str(v))]
    return [*flags, "--no-teacher-cache", *extra]  # the cache's progress bar is always shown


EVALUATION = ["--checkpoint-dir", "{d}", "--out-dir", "{d}/evaluation", "--num-images", "8",
              "--batch-size", "8", "--latency-repeats", "1", "--throughput-repeats", "1",
              "--throughput-batch", "2", "--warmup", "0", "--baseline-train-images", "0"]
EXPORT = ["--checkpoint", "{d}/tinyvae_best.pth", "--out-dir", "{d}/exports", "--num-images",
          "4", "--timing-repeats", "0"]
NO_FOLDER = ["--dataset", "imagefolder", "--data-dir", "{d}/nowhere"]
CORRUPT = "{d}/corrupt.pth is not a readable PyTorch checkpoint (corrupt or truncated file?)"
PHOTOS_EXTRA = "needs scikit-image (module 'skimage'), which is not installed: pip install " \
    "'hrm-vision[photos]'"
DISK_FULL = "File too large"

CASES: list[Case] = []
for name in ("distill script", "distill module"):
    CASES += [
        Case(name, "checkpoint", distill("--teacher-checkpoint", "{d}/corrupt.pth"), CORRUPT),
        Case(name, "checkpoint", distill("--resume", "{d}/newer.pth"),
             "{d}/newer.pth has checkpoint format_version 99, newer than the version"),
        Case(name, "config", distill("--config", "{d}/bad.json"),
             "{d}/bad.json is not valid JSON: Expecting value at line 1, column 12"),
        Case(name, "config", distill("--kl-weight", "-1"),
             "kl_weight: Input should be greater than or equal to 0"),
        Case(name, "dataset", distill("--data-dir", "{d}/nowhere"),
             "image folder not found: {d}/nowhere"),
        Case(name, "disk full", distill(),
             "cannot write {d}/ckpt/tinyvae_best.pth: File too large",
             file_size_limit=FULL_DISK_BYTES),
        Case(name, "missing extra", distill("--dataset", "photos"), PHOTOS_EXTRA,
             hide_skimage=True),
    ]
CASES += [
    Case("evaluation", "checkpoint", [*EVALUATION, "--student", "{d}/corrupt.pth"], CORRUPT),
    Case("evaluation", "config", [*EVALUATION, "--image-size", "30"],
         "must be divisible by 8, got 30x30"),
    Case("evaluation", "dataset", [*EVALUATION, *NO_FOLDER], "image folder not found"),
    Case("evaluation", "disk full", EVALUATION, DISK_FULL, file_size_limit=FULL_DISK_BYTES),
    Case("evaluation", "missing extra", EVALUATION, PHOTOS_EXTRA, hide_skimage=True),
    Case("export", "checkpoint", [*EXPORT, "--checkpoint", "{d}/corrupt.pth"], CORRUPT),
    Case("export", "checkpoint", [*EXPORT, "--checkpoint", "{d}/teacher.pth"],
         "{d}/teacher.pth has no 'student' model"),
    Case("export", "dataset", [*EXPORT, *NO_FOLDER], "image folder not found"),
    Case("export", "disk full", EXPORT, DISK_FULL, file_size_limit=FULL_DISK_BYTES),
    Case("export", "missing extra", EXPORT, PHOTOS_EXTRA, hide_skimage=True),
]


def make_files(d: Path) -> None:
    """The files the cases name, all made here (nothing is downloaded)."""
    tiny_run.prepare(d, 1)  # images/ and teacher.pth of the tiny run
    torch.manual_seed(0)
    save_checkpoint(model_entry(MinimalVAE(8, 8), "student"), d / "tinyvae_best.pth")
    good = (d / "tinyvae_best.pth").read_bytes()
    (d / "corrupt.pth").write_bytes(good[: len(good) // 2])
    torch.save({"format_version": 99, "phase": "distill"}, d / "newer.pth")
    (d / "bad.json").write_text('{"epochs": }\n')
    fake = d / "no_skimage" / "skimage"
    fake.mkdir(parents=True)  # shadows scikit-image, as if it were not installed
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'skimage'\", name='skimage')\n")


#: The command runner preloading torch and the package (see ``tests/helpers/forked.py``).
FORK_RUNNER = command_runner(
    "import numpy, torch, torchvision, matplotlib, pydantic, tqdm\n"
    "import hrm_vision.io, hrm_vision.cli, hrm_vision.train.trainer, hrm_vision.evaluate, "
    "hrm_vision.export")  # not distill.__main__: `-m hrm_vision.train` runs it afresh

#: A script that runs ``hrm-vision distill`` with a real bug inside the trainer.
BUGGY_TRAINER = """
import sys
from hrm_vision.train import trainer
from hrm_vision import cli

def run(self, resume=None, force_resume=False):
    raise TypeError("a real bug")

trainer.Distiller.run = run
sys.exit(cli.main(["distill", *sys.argv[1:]]))
"""


def run_cases(cases: list[Case], d: Path) -> list[Outcome]:
    """Run ``cases`` (``{d}``: the case folder, each case in its own subfolder for outputs),
    then ``d/buggy_trainer.py`` (:data:`BUGGY_TRAINER`) with the tiny run's flags: the last
    outcome."""
    jobs = []
    for i, case in enumerate(cases):
        command, _ = COMMANDS[case.command]
        prefix = [str(d / "no_skimage")] if case.hide_skimage else []
        argv = [str(ROOT / a) if a.endswith(".py") else a for a in command]
        argv += [a.replace("{d}", str(d / f"case{i}")) for a in case.args]
        jobs.append([argv, prefix, str(d / f".out{i}"), str(d / f".err{i}"),
                     case.file_size_limit])
        work = d / f"case{i}"
        work.mkdir(exist_ok=True)
        for name in ("images", "teacher.pth", "tinyvae_best.pth", "corrupt.pth", "newer.pth",
                     "bad.json"):
            if not (work / name).exists():
                (work / name).symlink_to(d / name)
    (d / "buggy_trainer.py").write_text(BUGGY_TRAINER)
    jobs.append([[str(d / "buggy_trainer.py"), *(a.replace("{d}", str(d)) for a in distill())],
                 [], str(d / ".out_bug"), str(d / ".err_bug"), None])
    return run_commands(FORK_RUNNER, jobs, ROOT, timeout=900, drop_env=(cli.TRACEBACK_ENV,),
                        runners=2)


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("command_errors")
    make_files(d)
    return d


@pytest.fixture(scope="module")
def table(case_dir: Path) -> list[Outcome]:
    """Every case of the table, then the buggy trainer, run once."""
    return run_cases(CASES, case_dir)


@pytest.fixture(scope="module")
def outcomes(table: list[Outcome]) -> list[Outcome]:
    """Every case of the table."""
    return table[:len(CASES)]


def test_every_command_meets_every_failure() -> None:
    failures = {"checkpoint", "config", "dataset", "disk full", "missing extra"}
    for command in COMMANDS:
        seen = {c.failure for c in CASES if c.command == command}
        assert seen == failures - ({"config"} if command == "export" else set()), command


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{c.command}: {c.failure}: {c.expect[:40]}" for c in CASES])
def test_expected_failure_is_one_line_and_status_2(index: int, outcomes: list[Outcome],
                                                   case_dir: Path) -> None:
    case, proc = CASES[index], outcomes[index]
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith(COMMANDS[case.command][1]), err
    assert case.expect.replace("{d}", str(case_dir / f"case{index}")) in err, err


def test_full_disk_keeps_no_temporary_file(outcomes: list[Outcome], case_dir: Path) -> None:
    """The write that failed left neither a half-written file nor its temporary file."""
    for i, case in enumerate(CASES):
        if case.failure == "disk full" and case.command.startswith("distill"):
            ckpt = case_dir / f"case{i}" / "ckpt"
            assert (ckpt / "config.json").is_file()
            assert sorted(p.name for p in ckpt.glob("*.pth")) == []
            assert list(ckpt.glob(".*.tmp")) == []


def test_a_real_bug_keeps_its_traceback(table: list[Outcome]) -> None:
    """Only expected failures are shortened: a TypeError inside the trainer is a traceback
    (uncaught: the child prints it and exits 1, as Python does)."""
    proc = table[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "TypeError: a real bug" in proc.stderr


class TestErrorPath:
    """The two pieces of :mod:`hrm_vision.cli` the commands above rely on."""

    def test_a_write_failure_wrapped_by_torch_is_the_os_error(
            self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)

        def main(argv: list[str] | None) -> int:
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] .") from None

        assert cli.run_main("tool", main, []) == 2
        assert capsys.readouterr().err == "tool: error: [Errno 28] No space left on device\n"

        def buggy(argv: list[str] | None) -> int:
            raise RuntimeError("a real bug")

        with pytest.raises(RuntimeError, match="a real bug"):
            cli.run_main("tool", buggy, [])

    def test_a_script_missing_an_extra_at_import_is_one_line(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """What ``training/distill_tinyvae.py`` does: the command module is imported inside the
        error path, so a missing extra at import names the extra instead of a traceback."""
        monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
        (tmp_path / "needs_onnx_mod.py").write_text(
            "raise ModuleNotFoundError(\"No module named 'onnx'\", name='onnx')\n")
        (tmp_path / "fine_mod.py").write_text(
            "def command(argv, prog):\n    return 0 if (argv, prog) == (['x'], 'tool') else 5\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setitem(cli.COMMANDS, "needs-onnx", cli.Command("needs_onnx_mod", "-"))
        monkeypatch.setitem(cli.COMMANDS, "fine", cli.Command("fine_mod", "-"))
        assert cli.run("needs-onnx", [], prog="tool") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tool: error: this command needs onnx")
        assert "pip install 'hrm-vision[export]'" in err
        assert cli.run("fine", ["x"], prog="tool") == 0
