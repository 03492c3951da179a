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
