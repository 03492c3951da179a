"""The thin scripts: flags override the JSON config, errors are one clear line, the training
script runs in-process end to end, and the quick self-check passes."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from hrm_vision.cli import run_main
from hrm_vision.train import command
from hrm_vision.train.config import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    return run_main("hrm-vision distill", command, argv)


def selfcheck_main(argv: list[str]) -> int:
    """``training/test_distillation.py``'s ``main``."""
    return runpy.run_path(str(ROOT / "training" / "test_distillation.py"))["main"](argv)
TINY_FLAGS = ["--dataset", "photos", "--train-samples", "16", "--val-samples", "8",
              "--batch-size", "8", "--teacher-latent-dim", "16", "--teacher-base-channels", "8",
              "--teacher-blocks-per-stage", "1", "--student-latent-dim", "8",
              "--student-base-channels", "8", "--device", "cpu"]


class TestFlags:
    def test_given_flags_override_the_file_others_do_not(self, tmp_path) -> None:
        cfg_file = tmp_path / "c.json"
        cfg_file.write_text(json.dumps({"epochs": 9, "batch_size": 16, "learning_rate": 0.01,
                                        "teacher_cache": False}))
        args = build_parser("x").parse_args(["--config", str(cfg_file), "--epochs", "2",
                                        "--lr", "0.005"])
        cfg = config_from_args(args)
        assert (cfg.epochs, cfg.learning_rate) == (2, 0.005)  # flags win
        assert (cfg.batch_size, cfg.teacher_cache) == (16, False)  # file beats defaults
        assert cfg.kl_weight == 0.1  # default

    def test_short_flags_exist(self) -> None:
        args = build_parser("x").parse_args(["--dataset", "photos", "--epochs", "3", "--batch-size",
                                        "8", "--lr", "0.1", "--device", "cpu",
                                        "--checkpoint-dir", "x", "--no-teacher-cache",
                                        "--train-samples", "none"])
        cfg = config_from_args(args)
        assert (cfg.dataset, cfg.epochs, cfg.batch_size, cfg.learning_rate, cfg.device,
                cfg.checkpoint_dir, cfg.teacher_cache, cfg.train_samples) == (
            "photos", 3, 8, 0.1, "cpu", "x", False, None)

    def test_bad_json_is_one_line_with_position(self, tmp_path, capsys) -> None:
        bad = tmp_path / "bad.json"
        bad.write_text('{"epochs": 3\n "batch_size": 8}')
        assert main(["--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "line 2, column 2" in err and "Traceback" not in err

    def test_unknown_key_named(self, tmp_path, capsys) -> None:
        cfg = tmp_path / "c.json"
        cfg.write_text(json.dumps({"temprature": 2}))
        assert main(["--config", str(cfg)]) == 2
        assert "unknown key 'temprature'" in capsys.readouterr().err

    def test_negative_weight_flag_named(self, capsys) -> None:
        assert main(["--kl-weight", "-1", "--dataset", "photos"]) == 2
        assert "kl_weight" in capsys.readouterr().err


class TestScripts:
    def test_distill_script_runs_in_process(self, tmp_path, monkeypatch, capsys) -> None:
        out = tmp_path / "ckpt"
        monkeypatch.setattr(sys, "argv", ["distill_tinyvae.py", *TINY_FLAGS, "--epochs", "1",
                                          "--teacher-epochs", "1", "--checkpoint-dir", str(out)])
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(ROOT / "training" / "distill_tinyvae.py"), run_name="__main__")
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert f"checkpoints: {out.resolve()}" in text and "student PSNR" in text
        assert json.loads((out / "config.json").read_text())["train_samples"] == 16
        assert (out / "tinyvae_best.pth").is_file() and (out / "teacher.pth").is_file()

    def test_selfcheck_passes(self, capsys) -> None:
        assert selfcheck_main([]) == 0
        text = capsys.readouterr().out
        assert text.count("PASS") == 3 and "all checks passed" in text


class TestReport:
    def test_rows_pick_best_or_given_epoch(self, tmp_path, capsys) -> None:
        from hrm_vision.evaluation.runs import main as report_main

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
        assert report_main([f"run={tmp_path}"]) == 0
        out = capsys.readouterr().out
        assert "| run | 1 | 4 (best 3) | 19.50 |" in out
        assert "| run: teacher pre-training | 1 | 1 (best 1) | 20.00 |" in out
        report_main(["--epoch", "1", f"run={tmp_path}"])
        assert "| run | 1 | 1 | 18.00 |" in capsys.readouterr().out

    def test_seeds_aggregate_and_gain_is_paired_by_seed(self, tmp_path, capsys) -> None:
        from hrm_vision.evaluation.runs import main as report_main

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
        assert report_main(["--baseline", "alone", f"alone={alone}", f"kd={distilled}"]) == 0
        out = capsys.readouterr().out
        kd = next(line for line in out.splitlines() if line.startswith("| kd |"))
        cells = [c.strip() for c in kd.strip("|").split("|")]
        assert cells[1] == "2" and cells[3] == "34.00 ± 4.24"
        assert cells[-2] == "+1.50 ± 0.71 (2)" and cells[-1] == "10 ± 1"
        with pytest.raises(SystemExit):
            report_main(["--baseline", "nothere", f"alone={alone}"])
