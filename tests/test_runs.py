"""The runs table (``training/runs.py``): the best or a given epoch of each run, seeds
aggregated and gains paired by seed; ``history.json`` files it did not write, crafted or broken,
are one line naming the file (status 2), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.scripts import load_script  # tests/ is on sys.path (pytest prepend mode)

from hrm_vision import cli

ROOT = Path(__file__).resolve().parents[1]
GOOD = [{"phase": "distill", "epoch": 1, "val": {"psnr": 20.0}, "time_s": 1.0}]
RUNS = load_script("training/runs.py", "runs")


def script(run_dir: Path) -> subprocess.CompletedProcess[str]:
    """``python training/runs.py run=DIR`` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(cli.TRACEBACK_ENV, None)
    return subprocess.run([sys.executable, str(ROOT / "training" / "runs.py"), f"run={run_dir}"],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
           ) -> Callable[[Path], tuple[int, str, str]]:
    """What ``python training/runs.py run=DIR`` does (its ``__main__``: ``main`` through
    :func:`hrm_vision.cli.run_main`), in this process: ``(status, stdout, stderr)``."""
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)

    def run(run_dir: Path) -> tuple[int, str, str]:
        status = cli.run_main(RUNS.PROG, RUNS.main, [f"run={run_dir}"])
        out, err = capsys.readouterr()
        return status, out, err
    return run


@pytest.mark.parametrize(("text", "says"), [
    ("[" * 100_000 + "]" * 100_000, "RecursionError"),
    ("[" + "9" * 5000 + "]", "ValueError"),
    ("[{", "JSONDecodeError"),
    (json.dumps({"phase": "distill"}), "must hold a list of epoch records, got dict"),
    (json.dumps([{**GOOD[0], "epoch": "one"}]), "record 0 lacks or mistypes epoch"),
    (json.dumps([{**GOOD[0], "val": {}}]), "record 0 lacks or mistypes val.psnr"),
], ids=["nested", "huge_number", "syntax", "not_a_list", "bad_field", "no_metric"])
def test_a_bad_history_is_one_line_naming_the_file(tmp_path, report, text, says) -> None:
    (tmp_path / "history.json").write_text(text)
    status, _, err = report(tmp_path)
    assert status == 2, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "history.json") in err and says in err, err


def test_the_script_says_a_missing_history_in_one_line_and_status_2(tmp_path) -> None:
    """The command as the user runs it (a fresh interpreter): its exit status and one line."""
    proc = script(tmp_path)
    assert proc.returncode == 2 and "history.json" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_missing_history_and_a_nested_config_are_one_line(tmp_path, report) -> None:
    status, _, err = report(tmp_path)
    assert status == 2 and "history.json" in err, err
    assert "Traceback" not in err
    (tmp_path / "history.json").write_text(json.dumps(GOOD))
    (tmp_path / "config.json").write_text("{\"seed\": " + "[" * 100_000 + "]" * 100_000 + "}")
    status, _, err = report(tmp_path)
    assert status == 2 and "config.json" in err, err
    assert "Traceback" not in err
    (tmp_path / "config.json").write_text(json.dumps({"seed": 3}))
    status, out, err = report(tmp_path)
    assert status == 0 and "| run | 1 | 1 (best 1) | 20.00 |" in out, err


class TestReport:
    def test_rows_pick_best_or_given_epoch(self, tmp_path, capsys) -> None:
        def rec(phase: str, epoch: int, total: float, psnr: float) -> dict:
            val = {"total": total, "psnr": psnr, "ssim": 0.5}
            if phase == "distill":
                val.update(teacher_psnr=20.0, teacher_ssim=0.6, quality_ratio=psnr / 20.0,
                           cka=0.7, cka_raw=0.6)
            return {"phase": phase, "epoch": epoch, "val": val, "time_s": 10.0}

        # epoch 2 has the lowest total loss, epoch 3 the highest PSNR (the best, as the trainer
        # picks it), epoch 4 ties epoch 3 (the earlier one stays best)
        history = [rec("teacher", 1, 1.0, 20.0), rec("distill", 1, 0.5, 18.0),
                   rec("distill", 2, 0.3, 19.0), rec("distill", 3, 0.4, 19.5),
                   rec("distill", 4, 0.6, 19.5)]
        (tmp_path / "history.json").write_text(json.dumps(history))
        assert RUNS.main([f"run={tmp_path}"]) == 0
        out = capsys.readouterr().out
        assert "| run | 1 | 4 (best 3) | 19.50 |" in out
        assert "| run: teacher pre-training | 1 | 1 (best 1) | 20.00 |" in out
        RUNS.main(["--epoch", "1", f"run={tmp_path}"])
        assert "| run | 1 | 1 | 18.00 |" in capsys.readouterr().out

    def test_seeds_aggregate_and_gain_is_paired_by_seed(self, tmp_path, capsys) -> None:
        def run(name: str, seed: int, psnr: float) -> str:
            d = tmp_path / name
            d.mkdir()
            val = {"psnr": psnr, "ssim": 0.9, "teacher_psnr": 40.0, "cka": 0.9, "cka_raw": 0.8,
                   "cross_psnr": psnr - 1}
            (d / "history.json").write_text(json.dumps(
                [{"phase": "distill", "epoch": 1, "val": val, "time_s": 10.0 + seed}]))
            (d / "config.json").write_text(json.dumps({"seed": seed}))
            return str(d)

        # seed 1 is easier for both; the per-seed gains are 1.0 and 2.0 whatever the order given
        alone = ",".join([run("a0", 0, 30.0), run("a1", 1, 35.0)])
        distilled = ",".join([run("d1", 1, 37.0), run("d0", 0, 31.0)])
        assert RUNS.main(["--baseline", "alone", f"alone={alone}", f"kd={distilled}"]) == 0
        out = capsys.readouterr().out
        kd = next(line for line in out.splitlines() if line.startswith("| kd |"))
        cells = [c.strip() for c in kd.strip("|").split("|")]
        assert cells[1] == "2" and cells[3] == "34.00 ± 4.24"
        assert cells[-2] == "+1.50 ± 0.71 (2)" and cells[-1] == "10 ± 1"
        with pytest.raises(SystemExit):
            RUNS.main(["--baseline", "nothere", f"alone={alone}"])
