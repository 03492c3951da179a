"""The documented limits of the IRP host (plugins run in its process), each pinned as
docs/robustness.md states it: ``os._exit`` in a run is caught, other hard exits end the host
with partial but complete telemetry lines; a ``step()`` that never returns and an entry point
that loops at import hang the host until ``timeout`` stops it (status 124)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from PIL import Image
from test_irp_registry import fake_distribution  # tests/ is on sys.path under pytest

from hrm_vision.irp import ALLOW_ENV
from hrm_vision.irp.contract import HardExitError, os_exit_raises, validate_telemetry

ROOT = Path(__file__).resolve().parents[1]
INPUTS = 3

#: Plugins that end the process (``how`` on their 2nd input) or never return from ``step``.
LIMITS = """
import os, posix, time
from hrm_vision.irp import IRPState, hookimpl
from test_irp_contract import ToyConfig, ToyPlugin

class Mean(ToyPlugin):
    def init_state(self, x0, task_ctx):
        return IRPState(float(x0.mean()), 0, meta={})

def ends_on_second(how):
    class Ends(Mean):
        seen = 0
        def init_state(self, x0, task_ctx):
            type(self).seen += 1
            if type(self).seen == 2:
                how(0)
            return super().init_state(x0, task_ctx)
    return Ends

class Hangs(Mean):
    def step(self, state):
        open(os.environ["HRMV_MARKER"], "w").close()
        while True:
            time.sleep(0.05)

@hookimpl
def register_irp_plugins(register):
    register("mean", Mean, ToyConfig, kind="test")
    register("limits", Mean, ToyConfig, kind="test")  # named like its entry point
    register("os_exit", ends_on_second(lambda status: os._exit(status)), ToyConfig, kind="test")
    register("posix_exit", ends_on_second(posix._exit), ToyConfig, kind="test")
    register("bound_exit", ends_on_second(os._exit), ToyConfig, kind="test")  # bound at import
    register("hangs", Hangs, ToyConfig, kind="test")
"""

#: An entry point whose import never returns (it leaves a marker first).
LOOPS_AT_IMPORT = """
import os, time
open(os.environ["HRMV_MARKER"], "w").close()
while True:
    time.sleep(0.05)
"""


#: The ``timeout`` every host runs under: far more than the host's start (torch's import takes
#: up to about 4 s on a loaded 2-core machine); a hang test fires it early (:func:`hang`).
HANG_S = 60
#: How long a hang test lets the host go on after it reached the code that never returns (its
#: marker), before the timeout fires: 20 times the ``--time-budget`` of the hanging run.
GRACE_S = 2.0


def command(root: Path, args: list[str], timeout: float | None = None,
            **env: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``hrm-vision irp ARGS`` with the fake distributions
    under ``root`` installed, under coreutils ``timeout`` when ``timeout`` is given."""
    paths = [str(p) for p in sorted(root.glob("dist_*"))] + [str(ROOT), str(ROOT / "tests")]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1",
            "HRMV_MARKER": str(root / "marker"), **env}
    if ALLOW_ENV not in env:
        full.pop(ALLOW_ENV, None)
    argv = [sys.executable, "-m", "hrm_vision", "irp", *args]
    return (argv if timeout is None else ["timeout", str(timeout), *argv]), full


def host(root: Path, args: list[str], timeout: float | None = None,
         **env: str) -> subprocess.CompletedProcess[str]:
    """``hrm-vision irp ARGS`` run to its end (see :func:`command`)."""
    argv, full = command(root, args, timeout, **env)
    return subprocess.run(argv, capture_output=True, text=True, env=full, cwd=root, timeout=90)


class Hang(NamedTuple):
    """A hang stopped by ``timeout``: its exit status, standard error, whether the host was
    still running :data:`GRACE_S` after its marker, and the seconds from the timeout firing to
    the end."""

    returncode: int
    stderr: str
    hung: bool
    stop_s: float


def hang(root: Path, args: list[str], **env: str) -> Hang:
    """``hrm-vision irp ARGS`` under ``timeout HANG_S``: once its marker exists (the code that
    never returns has started) and :data:`GRACE_S` more have passed, the timeout fires at once
    (coreutils ``timeout`` takes a SIGALRM as its own expiry: it stops the host with SIGTERM
    and exits 124), instead of after the whole ``HANG_S``."""
    argv, full = command(root, args, HANG_S, **env)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=full, cwd=root)
    deadline = time.monotonic() + HANG_S
    while not (root / "marker").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        time.sleep(GRACE_S)
    hung = proc.poll() is None
    fired = time.monotonic()
    if hung:
        proc.send_signal(signal.SIGALRM)
    _, err = proc.communicate(timeout=60)
    return Hang(proc.returncode, err, hung, time.monotonic() - fired)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """``tmp_path`` with the ``limits`` entry point installed and :data:`INPUTS` images."""
    (tmp_path / "dist_limits").mkdir()
    fake_distribution(tmp_path / "dist_limits", {"hrmv_limits": LIMITS}, {"limits": "hrmv_limits"})
    for i in range(INPUTS):
        Image.new("RGB", (8, 8), (40 * i,) * 3).save(tmp_path / f"frame{i}.png")
    return tmp_path


def images(root: Path) -> list[str]:
    return ["--images", *(str(root / f"frame{i}.png") for i in range(INPUTS))]


def telemetry(path: Path) -> list[dict]:
    """Every line of ``path`` parsed and valid under the schema (a torn line fails here)."""
    text = path.read_text()
    assert text.endswith("\n"), "the last line is incomplete"
    records = [json.loads(line) for line in text.splitlines()]
    for record in records:
        validate_telemetry(record)
    return records


def test_os_exit_in_a_run_is_that_plugins_failure(root: Path) -> None:
    proc = host(root, ["--plugin", "mean", "--plugin", "os_exit", *images(root),
                       "--telemetry", "t.jsonl"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    records = telemetry(root / "t.jsonl")
    assert len(records) == INPUTS * 2  # one per input and plugin: a verdict can be given
    errors = [(r["plugin"], r["input_id"], r["error"]["type"]) for r in records if "error" in r]
    assert errors == [("os_exit", 1, "HardExitError")]
    assert "called os._exit(0)" in proc.stderr
    assert "mean: 3 of 3 inputs" in proc.stderr and "os_exit: 2 of 3 inputs" in proc.stderr


@pytest.mark.parametrize("plugin", ["posix_exit", "bound_exit"])
def test_another_hard_exit_ends_the_host_with_complete_lines_before_it(root: Path,
                                                                       plugin: str) -> None:
    proc = host(root, ["--plugin", "mean", "--plugin", plugin, *images(root),
                       "--telemetry", "t.jsonl"])
    assert proc.returncode == 0  # the plugin's status: the host had no say
    records = telemetry(root / "t.jsonl")
    # input 0 by both plugins, input 1 by "mean"; then posix._exit(0): no error record, no
    # summary lines, and fewer records than inputs x plugins, which is how a caller tells
    assert [r["input_id"] for r in records] == [0, 0, 1]
    assert not any("error" in r for r in records)
    assert len(records) < INPUTS * 2
    assert "of 3 inputs" not in proc.stderr


def test_a_step_that_never_returns_hangs_until_timeout_stops_it(root: Path) -> None:
    proc = hang(root, ["--plugin", "hangs", *images(root), "--time-budget", "0.1",
                       "--telemetry", "t.jsonl"])
    assert (root / "marker").exists()  # it was in step(), not still starting
    assert proc.hung, proc.stderr[-2000:]  # --time-budget did not stop it
    assert proc.returncode == 124 and proc.stop_s < 5, proc
    assert (root / "t.jsonl").read_text() == ""


@pytest.fixture
def loops(root: Path) -> Path:
    """``root`` with a second entry point, ``loops``, whose import never returns."""
    dist = root / "dist_limits"
    (dist / "hrmv_loops.py").write_text(LOOPS_AT_IMPORT)
    (entry_points,) = dist.glob("*.dist-info/entry_points.txt")
    entry_points.write_text(entry_points.read_text() + "loops = hrmv_loops\n")
    return root


def test_list_imports_every_entry_point_so_a_loop_at_import_hangs_it(loops: Path) -> None:
    proc = hang(loops, ["--list"])
    assert (loops / "marker").exists() and proc.hung, proc.stderr[-2000:]
    assert proc.returncode == 124, proc


def test_list_under_an_allow_list_never_imports_the_others(loops: Path) -> None:
    proc = host(loops, ["--list"], timeout=HANG_S, **{ALLOW_ENV: "limits"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hangs" in proc.stdout and "tinyvae" in proc.stdout
    assert not (loops / "marker").exists()


def test_a_run_imports_the_entry_point_named_like_its_plugin_only(loops: Path) -> None:
    proc = host(loops, ["--plugin", "limits", "--images", str(loops / "frame0.png")],
                timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (loops / "marker").exists()


def test_a_plugin_named_unlike_its_entry_point_imports_them_all(loops: Path) -> None:
    proc = hang(loops, ["--plugin", "mean", "--images", str(loops / "frame0.png")])
    assert (loops / "marker").exists() and proc.hung, proc.stderr[-2000:]
    assert proc.returncode == 124, proc


def test_os_exit_is_restored_and_still_ends_a_forked_child() -> None:
    real = os._exit
    with os_exit_raises():
        with pytest.raises(HardExitError, match=r"os._exit\(5\)"):
            os._exit(5)
        pid = os.fork()
        if pid == 0:  # the child: its os._exit must end it, not raise into pytest's code
            os._exit(7)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert os._exit is real
