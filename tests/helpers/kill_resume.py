"""Kill a tiny distillation run with SIGKILL at random moments, resume it each time, check it.

:func:`run` is what ``python -m experiments.kill_resume`` reports and what
``tests/test_resume.py`` asserts. Each round starts ``training/distill_tinyvae.py ... --resume
auto`` in a subprocess (see :mod:`.tiny_run` for the tiny setup), waits until it has saved at
least one new epoch, then SIGKILLs it after a further random delay (anywhere in the next epoch:
inside a step, during validation, while a checkpoint is being written). After each kill it
checks that ``tinyvae_last.pth`` still loads, and that the next run says it resumed from exactly
the epoch stored there. A last run finishes the job; then ``history.json`` and the final
checkpoint must hold every epoch exactly once and the final checkpoint must load as a model.

``compare=True`` also trains the same config without interruption and reports the largest
weight difference between the two final students (0.0 means the resumed run is bit-identical).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .tiny_run import SCRIPT, prepare

RESUMED = re.compile(r"resuming (\w+) from \S+ \(epoch (\d+), batch (\d+)\)")
FRESH = "resume auto: no checkpoint"
LAST = "tinyvae_last.pth"


def saved_epoch(ckpt_dir: Path) -> tuple[int, int] | None:
    """(epoch, step_in_epoch) stored in ``tinyvae_last.pth``; None if there is none yet.

    Raises ``CheckpointError`` if the file exists but does not load (a half-written file).
    """
    from hrm_vision.io import load_checkpoint

    path = ckpt_dir / LAST
    if not path.exists():
        return None
    payload = load_checkpoint(path)
    return int(payload["epoch"]), int(payload["step_in_epoch"])


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *argv, "--resume", "auto"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def resumed_from(log: Path) -> tuple[int, int] | None:
    """(epoch, batch) the run in ``log`` said it resumed from; None if it started fresh."""
    text = log.read_text(errors="replace")
    match = RESUMED.search(text)
    if match:
        return int(match.group(2)), int(match.group(3))
    if FRESH in text:
        return None
    raise AssertionError(f"{log}: the run neither resumed nor started fresh:\n{text[-2000:]}")


def wait_for_new_epoch(proc: subprocess.Popen[bytes], ckpt: Path, since: float,
                       timeout: float) -> bool:
    """Wait until ``tinyvae_last.pth`` is newer than ``since``; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        path = ckpt / LAST
        if path.exists() and path.stat().st_mtime > since:
            return True
        time.sleep(0.05)
    raise TimeoutError(f"no epoch saved within {timeout:.0f} s")


def run(workdir: Path, kills: int, epochs: int, seed: int, compare: bool,
        timeout: float = 600.0) -> dict[str, Any]:
    rng = random.Random(seed)
    argv = prepare(workdir, epochs)
    ckpt = workdir / "ckpt"
    rounds: list[dict[str, Any]] = []
    epoch_time = 2.0  # refined from the observed time between two saves
    for i in range(kills + 1):
        before = saved_epoch(ckpt)
        log = workdir / f"run_{i}.log"
        t0 = time.time()
        proc = start(argv, log)
        rnd: dict[str, Any] = {"round": i, "saved_before": before}
        if i < kills and wait_for_new_epoch(proc, ckpt, t0, timeout):
            t_saved = time.time()
            delay = rng.uniform(0.0, 1.5 * epoch_time)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                rnd["killed_after_s"] = round(time.time() - t0, 2)
            proc.wait()
            after = saved_epoch(ckpt)  # raises if the kill left a broken checkpoint
            if after and before and after[0] > before[0]:
                epoch_time = max(0.2, (time.time() - t_saved + delay) / 2)
            rnd["saved_after"] = after
        else:
            rnd["returncode"] = proc.wait(timeout=timeout)
        rnd["resumed_from"] = resumed_from(log)
        rnd["resumed_ok"] = rnd["resumed_from"] == before
        rounds.append(rnd)
        if "returncode" in rnd:
            break
    return {"rounds": rounds, **check_final(ckpt, epochs, workdir, argv, compare)}


def check_final(ckpt: Path, epochs: int, workdir: Path, argv: list[str],
                compare: bool) -> dict[str, Any]:
    from hrm_vision.io import load, load_checkpoint

    history = json.loads((ckpt / "history.json").read_text())
    epochs_seen = [r["epoch"] for r in history if r["phase"] == "distill"]
    payload = load_checkpoint(ckpt / LAST)
    stored = [r["epoch"] for r in payload["history"] if r["phase"] == "distill"]
    load(ckpt / "tinyvae_best.pth")
    final = load(ckpt / LAST)
    out: dict[str, Any] = {
        "history_epochs": epochs_seen,
        "history_complete": epochs_seen == list(range(1, epochs + 1)),
        "checkpoint_history_complete": stored == list(range(1, epochs + 1)),
        "final_epoch": int(payload["epoch"]),
        "leftover_tmp_files": len(list(ckpt.glob(".*.tmp"))),
    }
    if compare:
        ref_argv = [*argv, "--checkpoint-dir", str(workdir / "reference")]
        subprocess.run([sys.executable, str(SCRIPT), *ref_argv], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ref = load(workdir / "reference" / LAST)
        ref_state = ref.state_dict()
        out["max_weight_diff_vs_uninterrupted"] = max(
            (v.float() - ref_state[k].float()).abs().max().item()
            for k, v in final.state_dict().items() if v.is_floating_point())
    return out


def passed(summary: dict[str, Any], kills: int) -> bool:
    rounds = summary["rounds"]
    killed = sum("killed_after_s" in r for r in rounds)
    return (killed == kills and all(r["resumed_ok"] for r in rounds)
            and rounds[-1].get("returncode") == 0 and summary["history_complete"]
            and summary["checkpoint_history_complete"])
