"""SIGTERM (and SIGINT) to the whole process group, as Slurm, systemd and a terminal's Ctrl-C
send them, while DataLoader worker processes are running: the run saves like a signal to the
main process alone (status 143 or 130, ``*_last.pth`` mid-epoch), with no
"DataLoader worker ... killed by signal" traceback.

The run is a child in its own session; it writes a marker file from inside its second training
step and sleeps there, so the signal reaches the main process and the workers while the loader
is iterating (the workers hold prefetched batches).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_run  # tests/ is on sys.path (pytest prepend mode)

from hrm_vision.io import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

#: The distiller's command line, with the second training step writing ``argv[1]`` and then
#: sleeping for a second (the signal arrives meanwhile).
RUNNER = """
import sys, time
from pathlib import Path
from hrm_vision import cli
from hrm_vision.train.trainer import DistillPhase
marker, calls, original = Path(sys.argv[1]), [], DistillPhase.loss
def loss(self, module, index, x):
    calls.append(1)
    if len(calls) == 2:
        marker.write_text("in step 2")
        time.sleep(1.0)
    return original(self, module, index, x)
DistillPhase.loss = loss
sys.exit(cli.main(["distill", *sys.argv[2:]]))
"""


def run_and_signal_group(tmp_path: Path, signum: int) -> tuple[int, str]:
    """Start the tiny run with two workers in a new session, signal its whole process group
    from inside the second step; (exit status, standard error)."""
    argv = tiny_run.prepare(tmp_path, 2, num_workers=2, train_samples=24)
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(marker), *argv], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never reached its second step"
            time.sleep(0.05)
        os.killpg(proc.pid, signum)  # the main process and both workers
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_group_signal_with_workers_saves_and_exits(tmp_path: Path, signum: int,
                                                   status: int) -> None:
    code, err = run_and_signal_group(tmp_path, signum)
    name = signal.Signals(signum).name
    assert code == status, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    last = tmp_path / "ckpt" / "tinyvae_last.pth"
    assert f"stopped by {name} after the current step; saved {last}" in err, err[-3000:]
    saved = load_checkpoint(last)
    assert (saved["epoch"], saved["step_in_epoch"]) == (0, 2)  # after the step it was in
