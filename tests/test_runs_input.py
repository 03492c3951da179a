"""``python -m hrm_vision.evaluation.runs`` reads ``history.json`` files it did not write: a
crafted or broken one is one line naming the file (status 2), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOOD = [{"phase": "distill", "epoch": 1, "val": {"psnr": 20.0}, "time_s": 1.0}]


def report(run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hrm_vision.evaluation.runs", f"run={run_dir}"],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize(("text", "says"), [
    ("[" * 100_000 + "]" * 100_000, "RecursionError"),
    ("[" + "9" * 5000 + "]", "ValueError"),
    ("[{", "JSONDecodeError"),
    (json.dumps({"phase": "distill"}), "must hold a list of epoch records, got dict"),
    (json.dumps([{**GOOD[0], "epoch": "one"}]), "record 0 lacks or mistypes epoch"),
    (json.dumps([{**GOOD[0], "val": {}}]), "record 0 lacks or mistypes val.psnr"),
], ids=["nested", "huge_number", "syntax", "not_a_list", "bad_field", "no_metric"])
def test_a_bad_history_is_one_line_naming_the_file(tmp_path, text, says) -> None:
    (tmp_path / "history.json").write_text(text)
    proc = report(tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "history.json") in proc.stderr and says in proc.stderr, proc.stderr


def test_a_missing_history_and_a_nested_config_are_one_line(tmp_path) -> None:
    proc = report(tmp_path)
    assert proc.returncode == 2 and "history.json" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "history.json").write_text(json.dumps(GOOD))
    (tmp_path / "config.json").write_text("{\"seed\": " + "[" * 100_000 + "]" * 100_000 + "}")
    proc = report(tmp_path)
    assert proc.returncode == 2 and "config.json" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "config.json").write_text(json.dumps({"seed": 3}))
    proc = report(tmp_path)
    assert proc.returncode == 0 and "| run | 1 | 1 (best 1) | 20.00 |" in proc.stdout, proc.stderr
