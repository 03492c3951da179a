"""``tinyvae_best.pth`` is the best student of the whole run: a fine-tuning epoch replaces the
distilled student in it only when its validation PSNR beats every epoch before it, distillation
included; ``is_best`` in the history says which epochs did.

The fine-tuning phase's validation PSNR is shifted by a fixed number of dB (the rest of the
validation is real), so which phase wins does not depend on how the tiny models happen to
train.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_run  # tests/ is on sys.path (pytest prepend mode)

from hrm_vision.checkpoints import load_checkpoint
from hrm_vision.train.config import build_parser, config_from_args
from hrm_vision.train.trainer import DistillPhase, FinetunePhase
from hrm_vision.train.trainer import Distiller

FLAGS = {"train_samples": 16, "warmup_steps": 0, "learning_rate": 3e-3, "ema_decay": 0.5}


def tiny_config(workdir: Path, epochs: int, finetune_epochs: int, ckpt: str):
    argv = tiny_run.prepare(workdir, epochs, finetune_epochs=finetune_epochs,
                            checkpoint_dir=workdir / ckpt, **FLAGS)
    return config_from_args(build_parser("hrm-vision distill").parse_args(argv))


def shift_finetune_psnr(mp: pytest.MonkeyPatch, step_db: float) -> None:
    """The fine-tuning phase's k-th validation (k = 1, 2, ...) reports its PSNR plus
    ``k * step_db`` dB."""
    calls = []

    def validate(self: FinetunePhase) -> dict[str, float]:
        calls.append(1)
        values = DistillPhase.validate(self)
        return {**values, "psnr": values["psnr"] + len(calls) * step_db}

    mp.setattr(FinetunePhase, "validate", validate)


def run(config) -> tuple[Path, list[dict]]:
    Distiller(config, console=False).run()
    out = Path(config.checkpoint_dir)
    return out, json.loads((out / "history.json").read_text())


def flags(history: list[dict]) -> list[tuple[str, int, bool]]:
    return [(r["phase"], r["epoch"], r["is_best"]) for r in history]


def test_finetune_epochs_that_beat_distillation_replace_the_best(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fine-tuning epoch reports 20 dB more than the one before: each is the best so far,
    and ``tinyvae_best.pth`` ends with the last one's student."""
    shift_finetune_psnr(monkeypatch, 20.0)
    out, history = run(tiny_config(tmp_path, 2, 2, "run"))
    assert [r[:2] for r in flags(history)] == [("distill", 1), ("distill", 2),
                                              ("finetune", 1), ("finetune", 2)]
    assert [r[2] for r in flags(history)][2:] == [True, True]
    best = load_checkpoint(out / "tinyvae_best.pth")
    last = load_checkpoint(out / "tinyvae_finetune_last.pth")
    assert (best["phase"], best["epoch"]) == ("finetune", 2)
    assert best["best_psnr"] == history[-1]["val"]["psnr"]
    for name, value in last["student_state_dict"].items():
        assert torch.equal(best["student_state_dict"][name], value), name
    assert not (out / "tinyvae_finetune_best.pth").exists()


def test_finetune_epochs_that_do_not_beat_distillation_keep_the_distilled_best(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fine-tuning epochs 20 and 40 dB worse: ``tinyvae_best.pth`` holds exactly the student
    and adapter a run without fine-tuning writes there (its best distillation epoch), and no
    fine-tuning epoch is marked best."""
    distill_only, reference = run(tiny_config(tmp_path, 2, 0, "distill_only"))
    shift_finetune_psnr(monkeypatch, -20.0)
    out, history = run(tiny_config(tmp_path, 2, 2, "run"))
    assert flags(history)[:2] == flags(reference)
    assert [r[2] for r in flags(history)][2:] == [False, False]
    best = load_checkpoint(out / "tinyvae_best.pth")
    expected = load_checkpoint(distill_only / "tinyvae_best.pth")
    assert best["phase"] == "distill" and best["epoch"] == expected["epoch"]
    assert best["best_psnr"] == expected["best_psnr"]
    for key in ("student_state_dict", "adapter_state_dict"):
        for name, value in expected[key].items():
            assert torch.equal(best[key][name], value), f"{key}[{name}]"


def test_a_finetune_epoch_equal_to_the_distilled_best_does_not_replace_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ties keep the earlier epoch: a fine-tuning epoch that reports exactly the best
    distillation PSNR is not the best."""
    config = tiny_config(tmp_path, 1, 1, "run")
    distilled: list[float] = []

    def validate(self: FinetunePhase) -> dict[str, float]:
        return {**DistillPhase.validate(self), "psnr": distilled[0]}

    original = DistillPhase.validate

    def record(self: DistillPhase) -> dict[str, float]:
        values = original(self)
        if type(self) is DistillPhase:
            distilled.append(values["psnr"])
        return values

    monkeypatch.setattr(DistillPhase, "validate", record)
    monkeypatch.setattr(FinetunePhase, "validate", validate)
    out, history = run(config)
    assert flags(history) == [("distill", 1, True), ("finetune", 1, False)]
    assert load_checkpoint(out / "tinyvae_best.pth")["phase"] == "distill"
