"""``torchrun --nproc_per_node 2`` on CPU (gloo) on a tiny config: the run finishes, only rank 0
writes files, and the checkpoints load in a single process with no ``module.`` prefixes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_run  # tests/ is on sys.path (pytest prepend mode)

from hrm_vision.io import load, load_checkpoint
from hrm_vision.vae import MinimalVAE

HELPERS = Path(tiny_run.__file__).resolve().parent
EPOCHS = 5


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-process torchrun run (files written recorded per rank), stopped by SIGTERM once its
    first checkpoint exists, then finished by a single process with ``--resume auto``."""
    main = tiny_run.distill

    work = tmp_path_factory.mktemp("ddp")
    argv = tiny_run.prepare(work, EPOCHS)
    last = work / "ckpt" / "tinyvae_last.pth"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", str(HELPERS / "audit_writes.py"),
           "--under", str(work / "ckpt"), "--log-dir", str(work / "audit"),
           str(tiny_run.SCRIPT), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tiny_run.REPO)
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    stopped = load_checkpoint(last)
    writes = {r: json.loads((work / "audit" / f"rank{r}.json").read_text())
              for r in (0, 1) if (work / "audit" / f"rank{r}.json").exists()}
    resumed = main([*argv, "--resume", "auto"])
    return {"returncode": proc.returncode, "out": out, "err": err, "work": work,
            "last": last, "stopped": stopped, "writes": writes, "resumed": resumed}


@pytest.mark.slow
class TestTorchrunTwoProcesses:
    def test_two_ranks_train_and_stop_together_on_sigterm(self, ddp_run: dict) -> None:
        assert "world size 2" in ddp_run["out"] + ddp_run["err"]
        assert ddp_run["returncode"] != 0  # torchrun reports the signal
        # printed once (rank 0 only), after both ranks agreed on the step and rank 0 saved
        message = f"stopped by SIGTERM after the current step; saved {ddp_run['last']}"
        assert ddp_run["err"].count(message) == 1, ddp_run["err"][-3000:]
        assert 1 <= ddp_run["stopped"]["epoch"] < EPOCHS

    def test_only_rank_zero_writes(self, ddp_run: dict) -> None:
        writes = ddp_run["writes"]
        assert set(writes) == {0, 1}, "both ranks must report their writes"
        assert writes[1] == []
        names = {Path(p).name for p in writes[0]}
        assert {"tinyvae_last.pth", "tinyvae_best.pth", "history.json", "config.json"} <= names

    def test_checkpoint_loads_in_one_process_without_prefix(self, ddp_run: dict) -> None:
        payload = ddp_run["stopped"]
        for key in ("student_state_dict", "adapter_state_dict"):
            assert not [k for k in payload[key] if k.startswith("module.")]
        assert isinstance(load(ddp_run["work"] / "ckpt" / "tinyvae_best.pth"), MinimalVAE)

    def test_one_process_resumes_to_a_complete_history(self, ddp_run: dict) -> None:
        assert ddp_run["resumed"] == 0
        history = json.loads((ddp_run["work"] / "ckpt" / "history.json").read_text())
        assert [r["epoch"] for r in history if r["phase"] == "distill"] == list(
            range(1, EPOCHS + 1))
        assert load_checkpoint(ddp_run["last"])["epoch"] == EPOCHS
