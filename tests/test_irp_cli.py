"""One error path for ``hrm-vision irp`` (``python -m hrm_vision irp``): every expected
failure is one line on standard error, exit status 2, no traceback; a real bug keeps its
traceback. Each case runs the command in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from helpers.forked import Outcome, command_runner, run_commands  # tests/ is on sys.path
from PIL import Image

from hrm_vision import cli
from hrm_vision.io import model_entry, save, save_checkpoint
from hrm_vision.vae import MinimalVAE, TeacherVAE

ROOT = Path(__file__).resolve().parents[1]
HOST = ["-m", "hrm_vision", "irp"]


class Case(NamedTuple):
    """``args`` after the command (``{d}`` is the case folder); ``expect``: in the line."""

    name: str
    args: list[str]
    expect: str
    command: list[str] = HOST
    hide_pillow: bool = False


def tinyvae(checkpoint: str, **extra: object) -> list[str]:
    return ["--plugin", "tinyvae", "--config",
            "tinyvae=" + json.dumps({"checkpoint": checkpoint, **extra})]


GOOD = "{d}/good.pth"
IMAGE = ["--images", "{d}/frame.png"]

CASES = [
    # checkpoints (CheckpointError)
    Case("corrupt checkpoint", tinyvae("{d}/corrupt.pth") + IMAGE,
         "corrupt.pth is not a readable PyTorch checkpoint"),
    Case("truncated checkpoint", tinyvae("{d}/truncated.pth") + IMAGE,
         "truncated.pth is not a readable PyTorch checkpoint"),
    Case("checkpoint without a student", tinyvae("{d}/teacher.pth") + IMAGE,
         "teacher.pth has no 'student' model"),
    Case("checkpoint with NaN weights", tinyvae("{d}/nan.pth") + IMAGE,
         "NaN or infinite weights"),
    Case("corrupt safetensors", tinyvae("{d}/corrupt.safetensors") + IMAGE,
         "corrupt.safetensors is not a readable safetensors file"),
    # configs and values (ValueError)
    Case("missing checkpoint", tinyvae("{d}/none.pth") + IMAGE,
         "checkpoint: Value error, checkpoint file not found"),
    Case("misspelt config key", tinyvae(GOOD, stepsize=1) + IMAGE,
         "unknown key 'stepsize' (known keys: max_steps, halt_eps"),
    Case("config that is not JSON", ["--plugin", "tinyvae", "--config", "tinyvae={oops"] + IMAGE,
         "--config tinyvae: not valid JSON"),
    Case("unknown plugin", ["--plugin", "tinyvea"] + IMAGE, "no IRP plugin named 'tinyvea'"),
    Case("step budget 0", tinyvae(GOOD) + IMAGE + ["--step-budget", "0"],
         "step_budget must be at least 1"),
    Case("float image of unknown scale", tinyvae(GOOD) + ["--images", "{d}/hdr.tif"],
         "hdr.tif: float pixels in [0, 200], outside [0, 1]"),
    Case("float image with NaN", tinyvae(GOOD) + ["--images", "{d}/nan.tif"],
         "nan.tif: float pixels with NaN or infinite values"),
    Case("image size not a multiple of 8", tinyvae(GOOD) + ["--images", "{d}/odd.png"],
         "30x27 is not a multiple of 8"),
    # files (OSError)
    Case("missing image", tinyvae(GOOD) + ["--images", "{d}/nope.png"],
         "No such file or directory"),
    Case("undecodable image", tinyvae(GOOD) + ["--images", "{d}/broken.png"],
         "cannot identify image file"),
    Case("missing config file", ["--plugin", "tinyvae", "--config", "tinyvae={d}/none.json"]
         + IMAGE, "No such file or directory"),
    Case("telemetry in a missing folder", tinyvae(GOOD) + IMAGE
         + ["--telemetry", "{d}/no/such/dir/t.jsonl"], "No such file or directory"),
    # a missing extra (ImportError)
    Case("images without pillow", tinyvae(GOOD) + IMAGE, "pip install 'hrm-vision[train]'",
         hide_pillow=True),
]


def make_files(d: Path) -> None:
    """The files the cases name, all made here."""
    torch.manual_seed(0)
    student = MinimalVAE(latent_dim=8, base_channels=8).eval()
    save_checkpoint(model_entry(student, "student"), d / "good.pth")
    good = (d / "good.pth").read_bytes()
    (d / "corrupt.pth").write_bytes(b"\x00" * 64 + good[64:])
    (d / "truncated.pth").write_bytes(good[: len(good) // 2])
    save_checkpoint(model_entry(TeacherVAE(latent_dim=16, base_channels=8, blocks_per_stage=1),
                                "teacher"), d / "teacher.pth")
    entry = model_entry(student, "student")
    state = entry["student_state_dict"] = {k: v.clone() for k, v in
                                           entry["student_state_dict"].items()}
    next(iter(state.values())).view(-1)[0] = float("nan")
    save_checkpoint(entry, d / "nan.pth")
    st = save(student, d / "corrupt.safetensors")
    st.write_bytes(st.read_bytes()[:100])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / "frame.png")
    Image.fromarray(rng.integers(0, 256, (30, 27, 3), dtype=np.uint8)).save(d / "odd.png")
    Image.fromarray(np.linspace(0, 200, 32 * 32, dtype=np.float32).reshape(32, 32)).save(
        d / "hdr.tif")
    nan = np.full((32, 32), 0.5, np.float32)
    nan[3, 3] = np.nan
    Image.fromarray(nan).save(d / "nan.tif")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    fake_pil = d / "no_pillow" / "PIL"
    fake_pil.mkdir(parents=True)  # shadows pillow, as if it were not installed
    (fake_pil / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'PIL'\", name='PIL')\n")


#: The command runner preloading the core modules only (pillow and the command modules are not
#: imported, so a hidden pillow is seen by the command as it would be in a fresh interpreter).
FORK_RUNNER = command_runner("import numpy, torch\nimport hrm_vision.irp")


def run_cases(cases: list[Case], d: Path, path: tuple[Path, ...] = ()) -> list[Outcome]:
    """Run ``cases`` (``{d}``: the case folder) as child processes; ``path``: folders put first
    on ``sys.path``."""
    jobs = []
    for i, case in enumerate(cases):
        prefix = [str(p) for p in path] + ([str(d / "no_pillow")] if case.hide_pillow else [])
        argv = case.command + [a.replace("{d}", str(d)) for a in case.args]
        jobs.append([argv, prefix, str(d / f".out{i}"), str(d / f".err{i}"), 0])
    return run_commands(FORK_RUNNER, jobs, d, timeout=600, drop_env=(cli.TRACEBACK_ENV,))


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("irp_errors")
    make_files(d)
    return d


@pytest.fixture(scope="module")
def outcomes(case_dir: Path) -> dict[str, Outcome]:
    """Every case of the table, run once."""
    return dict(zip([c.name for c in CASES], run_cases(CASES, case_dir), strict=True))


def test_the_runner_is_the_command(case_dir: Path) -> None:
    """The forking runner gives what a fresh ``python -m`` gives: status and standard error,
    for an expected failure and for a crash (traceback, status 1)."""
    (case_dir / "crashing_mod.py").write_text("raise RuntimeError('a real bug')\n")
    cases = [CASES[0], Case("crash", [], "", ["-m", "crashing_mod"])]
    forked = run_cases(cases, case_dir, path=(case_dir,))
    for case, got in zip(cases, forked, strict=True):
        fresh = subprocess.run(
            [sys.executable, *case.command, *[a.replace("{d}", str(case_dir)) for a in case.args]],
            capture_output=True, text=True, cwd=case_dir, timeout=300,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(case_dir), str(ROOT)]),
                 "OMP_NUM_THREADS": "1"})
        assert got.returncode == fresh.returncode != 0
        assert got.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
    assert forked[0].stderr.count("\n") == 1
    assert "Traceback" in forked[1].stderr and "RuntimeError: a real bug" in forked[1].stderr


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_expected_failure_is_one_line_and_status_2(case: Case, outcomes: dict,
                                                   case_dir: Path) -> None:
    d, proc = case_dir, outcomes[case.name]
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hrm-vision irp: error: "), err
    assert case.expect.replace("{d}", str(d)) in err, err


def test_telemetry_file_not_created_when_an_image_is_bad(case_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    proc = run_cases([Case("bad image", tinyvae(GOOD) + ["--images", "{d}/hdr.tif",
                                                         "--telemetry", str(out)], "")],
                     case_dir)[0]
    assert proc.returncode == 2 and not out.exists()


BOOM = """
from hrm_vision.irp import IRPConfig, IRPPlugin, IRPState, hookimpl

class Boom(IRPPlugin):
    name = "boom"

    def init_state(self, x0, task_ctx):
        return IRPState(0.0, 0, 1.0)

    def energy(self, state):
        return 1.0

    def step(self, state):
        raise RuntimeError("boom in step")

@hookimpl
def register_irp_plugins(register):
    register("boom", Boom, IRPConfig, kind="test")
"""


def test_a_failing_plugin_leaves_the_others_results_and_status_1(case_dir: Path,
                                                                  tmp_path: Path) -> None:
    from test_irp_registry import fake_distribution  # tests/ is on sys.path under pytest

    fake_distribution(tmp_path, {"hrmv_boom": BOOM}, {"boom": "hrmv_boom"})
    out = tmp_path / "t.jsonl"
    case = Case("boom", tinyvae(GOOD) + ["--plugin", "boom", "--images", "{d}/frame.png",
                                         "{d}/frame.png", "--telemetry", str(out)], "")
    proc = run_cases([case], case_dir, path=(tmp_path,))[0]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "hrm-vision irp: warning: plugin 'boom' failed (run) on input 0: RuntimeError: boom in "
        "step",
        "hrm-vision irp: warning: plugin 'boom' failed (run) on input 1: RuntimeError: boom in "
        "step",
        lines[2], "boom: 0 of 2 inputs"], proc.stderr
    assert lines[2].startswith("tinyvae: 2 of 2 inputs, mean energy ")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["plugin"], r["input_id"], "error" in r) for r in records] == [
        ("tinyvae", 0, False), ("boom", 0, True), ("tinyvae", 1, False), ("boom", 1, True)]


class TestRunMain:
    """The helper every command's ``main`` goes through."""

    @pytest.mark.parametrize("exc, line", [
        (ValueError("bad value\n  second line"), "tool: error: bad value second line"),
        (FileNotFoundError(2, "No such file or directory", "x.png"),
         "tool: error: [Errno 2] No such file or directory: 'x.png'"),
        (ImportError("needs pillow: pip install 'hrm-vision[train]'"),
         "tool: error: needs pillow: pip install 'hrm-vision[train]'"),
    ])
    def test_expected_errors(self, exc: Exception, line: str,
                             capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)

        def main(argv: list[str] | None) -> int:
            raise exc

        assert cli.run_main("tool", main, []) == 2
        assert capsys.readouterr().err == line + "\n"

    def test_pydantic_errors_name_the_fields(self, capsys: pytest.CaptureFixture[str]) -> None:
        from pydantic import BaseModel, ConfigDict

        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")
            epochs: int

        def main(argv: list[str] | None) -> int:
            Config.model_validate({"epochs": "many", "epohcs": 3})
            return 0

        assert cli.run_main("tool", main, []) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "epochs: Input should be a valid integer" in err
        assert "unknown key 'epohcs'" in err

    def test_bugs_keep_their_traceback_and_statuses_pass_through(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        def buggy(argv: list[str] | None) -> int:
            raise TypeError("a real bug")

        with pytest.raises(TypeError, match="a real bug"):
            cli.run_main("tool", buggy, [])
        assert cli.run_main("tool", lambda argv: 3, []) == 3
        assert cli.run_main("tool", lambda argv: None, []) == 0
        monkeypatch.setenv(cli.TRACEBACK_ENV, "1")

        def failing(argv: list[str] | None) -> int:
            raise ValueError("shown with its traceback")

        with pytest.raises(ValueError, match="shown with its traceback"):
            cli.run_main("tool", failing, [])
