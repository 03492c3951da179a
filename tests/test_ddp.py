"""``torchrun --nproc_per_node 2`` on CPU (gloo) on a tiny config: the run finishes, only rank 0
writes files, and the checkpoints load in a single process with no ``module.`` prefixes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hrm_vision.checkpoints import load_checkpoint, load_model
from hrm_vision.vae import MinimalVAE

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A module from ``scripts/`` (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


EPOCHS = 2


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tiny_run = load_script("tiny_run")
    work = tmp_path_factory.mktemp("ddp")
    argv = tiny_run.prepare(work, EPOCHS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", str(REPO / "scripts" / "audit_writes.py"),
           "--under", str(work / "ckpt"), "--log-dir", str(work / "audit"),
           str(tiny_run.SCRIPT), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    return {"proc": proc, "work": work,
            "writes": {r: json.loads((work / "audit" / f"rank{r}.json").read_text())
                       for r in (0, 1) if (work / "audit" / f"rank{r}.json").exists()}}


@pytest.mark.slow
class TestTorchrunTwoProcesses:
    def test_run_succeeds_on_two_ranks(self, ddp_run: dict) -> None:
        proc = ddp_run["proc"]
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "world size 2" in proc.stdout + proc.stderr

    def test_only_rank_zero_writes(self, ddp_run: dict) -> None:
        writes = ddp_run["writes"]
        assert set(writes) == {0, 1}, "both ranks must report their writes"
        assert writes[1] == []
        names = {Path(p).name for p in writes[0]}
        assert {"tinyvae_last.pth", "tinyvae_best.pth", "history.json", "config.json"} <= names

    def test_checkpoint_loads_in_one_process_without_prefix(self, ddp_run: dict) -> None:
        ckpt = ddp_run["work"] / "ckpt"
        payload = load_checkpoint(ckpt / "tinyvae_last.pth")
        for key in ("student_state_dict", "adapter_state_dict"):
            assert not [k for k in payload[key] if k.startswith("module.")]
        assert isinstance(load_model(ckpt / "tinyvae_best.pth"), MinimalVAE)
        assert payload["epoch"] == EPOCHS
        history = json.loads((ckpt / "history.json").read_text())
        assert [r["epoch"] for r in history if r["phase"] == "distill"] == [1, 2]


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_then_one_process_resumes(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """torchrun forwards SIGTERM to the workers; they agree on the step, rank 0 saves, and the
    checkpoint resumes in a single process to a complete history."""
    import signal
    import time

    tiny_run = load_script("tiny_run")
    epochs = 6
    argv = tiny_run.prepare(tmp_path, epochs)
    last = tmp_path / "ckpt" / "tinyvae_last.pth"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nnodes", "1", "--nproc_per_node", "2", str(tiny_run.SCRIPT),
                             *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"stopped by SIGTERM after the current step; saved {last}" in err
    saved = load_checkpoint(last)
    assert saved["epoch"] < epochs

    from hrm_vision.distill.cli import main

    assert main([*argv, "--resume", "auto"]) == 0
    out = capsys.readouterr()
    assert f"resuming distill from {last} (epoch {saved['epoch']}" in out.out + out.err
    history = json.loads((tmp_path / "ckpt" / "history.json").read_text())
    assert [r["epoch"] for r in history if r["phase"] == "distill"] == list(range(1, epochs + 1))
