"""The trainer end to end on tiny models: files written, adapter trained and saved, best chosen by
validation PSNR, exact resume (also after SIGTERM mid-epoch), non-finite losses, teacher cache,
data initialisation of fresh models, user callbacks added to the default ones."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from hrm_vision.checkpoints import load_model, model_entry, save_checkpoint
from hrm_vision.train import (
    Distiller,
    TrainingDiverged,
    TrainingInterrupted,
    find_resume,
    load_config,
)
from hrm_vision.train.callbacks import Callback
from hrm_vision.train.loss import TERMS
from hrm_vision.train.trainer import DistillPhase, TeacherPhase
from hrm_vision.metrics import psnr
from hrm_vision.vae import MinimalVAE, TeacherVAE

TINY = {"dataset": "photos", "train_samples": 32, "val_samples": 16, "batch_size": 8,
        "teacher_latent_dim": 16, "teacher_base_channels": 8, "teacher_blocks_per_stage": 1,
        "student_latent_dim": 8, "student_base_channels": 8, "warmup_steps": 2,
        "log_interval": 2, "save_interval": 1, "device": "cpu"}


def tiny(tmp: Path, **kw: Any):
    return load_config(None, {**TINY, "checkpoint_dir": str(tmp), **kw})


def spy_init_from_data(mp: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, ...], float, float]]:
    """Record every ``init_from_data`` call of both models: (model class, images shape, min,
    max)."""
    seen: list[tuple[str, tuple[int, ...], float, float]] = []

    def spying(original):
        def spy(self, images: torch.Tensor) -> None:
            seen.append((type(self).__name__, tuple(images.shape), float(images.min()),
                         float(images.max())))
            original(self, images)
        return spy

    for cls in (TeacherVAE, MinimalVAE):
        mp.setattr(cls, "init_from_data", spying(cls.init_from_data))
    return seen


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, Distiller, list]:
    """Teacher pre-training (1 epoch) then distillation (2 epochs); the ``init_from_data``
    calls it made."""
    out = tmp_path_factory.mktemp("full")
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        calls = spy_init_from_data(mp)
        d = Distiller(tiny(out, epochs=2, teacher_epochs=1))
        d.run()
    return out, d, calls


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "t.pth"
    save_checkpoint(model_entry(TeacherVAE(16, 8, 1), "teacher"), path)
    return path


def student_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path)["student_state_dict"]


def test_only_last_checkpoints_carry_the_training_state(full_run) -> None:
    """The deployable files (best, teacher, snapshots) hold weights, architecture and metadata;
    optimizer, scheduler, scaler, RNG and the raw weights of the average only ``*_last.pth``."""
    out, _, _ = full_run
    state = {"optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict", "rng_state",
             "train_state_dict"}
    for name in ("tinyvae_best.pth", "teacher_best.pth", "teacher.pth", "tinyvae_epoch_001.pth"):
        payload = torch.load(out / name, weights_only=True)
        assert not state & set(payload), name
    best = torch.load(out / "tinyvae_best.pth", weights_only=True)
    assert {"student_state_dict", "student_arch", "adapter_state_dict", "epoch", "best_psnr",
            "history", "config"} <= set(best)
    for name in ("tinyvae_last.pth", "teacher_last.pth"):
        assert state <= set(torch.load(out / name, weights_only=True)), name


class TestEndToEnd:
    def test_files_written(self, full_run) -> None:
        out, _, _ = full_run
        for name in ("teacher.pth", "teacher_last.pth", "tinyvae_best.pth", "tinyvae_last.pth",
                     "tinyvae_epoch_001.pth", "tinyvae_epoch_002.pth", "config.json",
                     "history.json", "loss_curves.png", "distill_epoch_002.png",
                     "teacher_epoch_001.png"):
            assert (out / name).is_file(), name
        assert json.loads((out / "config.json").read_text())["epochs"] == 2

    def test_history_has_terms_and_metrics(self, full_run) -> None:
        out, _, _ = full_run
        hist = json.loads((out / "history.json").read_text())
        assert [(r["phase"], r["epoch"]) for r in hist] == [("teacher", 1), ("distill", 1),
                                                           ("distill", 2)]
        val = hist[-1]["val"]
        for key in (*TERMS, "total", "psnr", "ssim", "teacher_psnr", "teacher_ssim",
                    "quality_ratio", "cka", "cka_raw"):
            assert key in val and val[key] is not None, key
        assert set(TERMS) <= set(hist[-1]["train"])

    def test_deployment_snippet_loads_best(self, full_run, photo_batch) -> None:
        out, _, _ = full_run
        model = MinimalVAE(latent_dim=8, base_channels=8)
        checkpoint = torch.load(out / "tinyvae_best.pth")  # weights_only=True by default
        model.load_state_dict(checkpoint["student_state_dict"])
        model.eval()
        with torch.no_grad():
            latent = model.encode(photo_batch[:2])
            assert model.decode(latent).shape == (2, 3, 32, 32)

    def test_checkpoints_hold_only_cpu_tensors(self, full_run) -> None:
        out, _, _ = full_run
        for path in sorted(out.glob("*.pth")):
            locations: set[str] = set()

            def record(storage, location: str, seen: set[str] = locations):
                seen.add(location)
                return storage

            torch.load(path, map_location=record)
            assert locations == {"cpu"}, (path.name, locations)

    def test_adapter_trained_saved_and_in_optimizer(self, full_run) -> None:
        out, d, _ = full_run
        ckpt = torch.load(out / "tinyvae_last.pth")
        assert ckpt["adapter_arch"] == {"student_dim": 8, "teacher_dim": 16}
        first = torch.load(out / "tinyvae_epoch_001.pth")["adapter_state_dict"]["proj.weight"]
        assert not torch.equal(first, ckpt["adapter_state_dict"]["proj.weight"])
        # the model entries hold the weight average; the raw training weights travel too
        assert torch.equal(ckpt["train_state_dict"]["adapter.proj.weight"],
                           d.adapter.proj.weight.detach())
        assert not torch.equal(ckpt["adapter_state_dict"]["proj.weight"],
                               d.adapter.proj.weight.detach())
        # the student, the adapter and the likelihood scale of the loss train and are saved
        n_params = len(list(d.student.parameters())) + len(list(d.adapter.parameters())) + 1
        assert len(ckpt["optimizer_state_dict"]["state"]) == n_params
        assert ckpt["likelihood_log_sigma"].shape == ()
        assert not torch.equal(ckpt["train_state_dict"]["scale.log_sigma"],
                               ckpt["likelihood_log_sigma"])  # raw value vs its average
        for key in ("scheduler_state_dict", "scaler_state_dict", "rng_state", "epoch",
                    "best_psnr", "history", "config"):
            assert key in ckpt

    def test_best_is_highest_validation_psnr(self, full_run) -> None:
        out, _, _ = full_run
        hist = json.loads((out / "history.json").read_text())
        for phase, best_file in (("teacher", "teacher_best.pth"),
                                 ("distill", "tinyvae_best.pth")):
            recs = [r for r in hist if r["phase"] == phase]
            best = max(recs, key=lambda r: r["val"]["psnr"])
            saved = torch.load(out / best_file)
            assert saved["epoch"] == best["epoch"]
            assert saved["best_psnr"] == best["val"]["psnr"]
        teacher = torch.load(out / "teacher.pth")
        assert teacher["epoch"] == max((r for r in hist if r["phase"] == "teacher"),
                                       key=lambda r: r["val"]["psnr"])["epoch"]
        v = hist[-1]["val"]
        weights = {"recon": 0.3, "kl": 0.1, "distill_latent": 0.3, "distill_recon": 0.2,
                   "perceptual": 0.1}
        assert v["total"] == pytest.approx(sum(weights[k] * v[k] for k in TERMS), rel=1e-4)

    def test_cross_decoding_reported_and_near_the_student(self, full_run) -> None:
        """The adapter starts from the linear paths, so after a short run the teacher's decoder
        reads the adapted student latent about as well as the student's own decoder."""
        out, _, _ = full_run
        hist = json.loads((out / "history.json").read_text())
        v = [r for r in hist if r["phase"] == "distill"][-1]["val"]
        assert abs(v["cross_psnr"] - v["psnr"]) < 3.0

    def test_validation_psnr_is_pooled_over_the_set(self, full_run) -> None:
        out, d, _ = full_run
        student = load_model(out / "tinyvae_last.pth")
        x = torch.stack([d.val_set[i][1] for i in range(len(d.val_set))])
        with torch.no_grad():
            expected = psnr(student.eval()(x).reconstruction, x)
        recorded = json.loads((out / "history.json").read_text())[-1]["val"]["psnr"]
        assert recorded == pytest.approx(expected, abs=1e-3)

    def test_teacher_found_in_checkpoint_dir_is_reused(self, full_run) -> None:
        out, _, _ = full_run
        d = Distiller(tiny(out, epochs=0, teacher_epochs=5))
        d.run()
        assert d.teacher_source == str(out / "teacher.pth")
        assert len([r for r in d.history if r["phase"] == "teacher"]) == 0


@pytest.mark.slow
class TestResume:
    @pytest.mark.parametrize("kill_step", [3, 1], ids=["epoch-end", "mid-epoch"])
    def test_sigterm_saves_and_resume_continues_exactly(self, tmp_path, teacher_file,
                                                        kill_step) -> None:
        class KillAt(Callback):
            def on_batch_end(self, trainer, phase, step, terms) -> None:
                if trainer.current_epoch == 0 and step == kill_step:
                    os.kill(os.getpid(), signal.SIGTERM)

        cfg = {"epochs": 2, "teacher_checkpoint": str(teacher_file)}
        straight = tmp_path / "straight"
        Distiller(tiny(straight, **cfg)).run()
        killed = tmp_path / "killed"
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(TrainingInterrupted, match="SIGTERM") as info:
            Distiller(tiny(killed, **cfg), callbacks=[KillAt()], console=False).run()
        assert info.value.checkpoint == killed / "tinyvae_last.pth"
        ckpt = torch.load(killed / "tinyvae_last.pth")
        assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, kill_step + 1)
        assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
        d = Distiller(tiny(killed, **cfg))
        d.run(resume="auto" if kill_step == 3 else find_resume(killed))
        a, b = student_state(straight / "tinyvae_last.pth"), student_state(killed /
                                                                            "tinyvae_last.pth")
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
        assert [r["epoch"] for r in d.history] == [1, 2]

    def test_resume_rejects_a_model_only_checkpoint(self, tmp_path, teacher_file) -> None:
        from hrm_vision.checkpoints import CheckpointError
        d = Distiller(tiny(tmp_path, epochs=1, teacher_checkpoint=str(teacher_file)))
        with pytest.raises(CheckpointError, match="not a training checkpoint"):
            d.run(resume=teacher_file)


@pytest.mark.slow
class TestBadSteps:
    def test_non_finite_losses_stop_and_keep_last_good_checkpoint(self, tmp_path,
                                                                  teacher_file) -> None:
        cfg = {"teacher_checkpoint": str(teacher_file), "max_bad_steps": 3}
        Distiller(tiny(tmp_path, epochs=1, **cfg)).run()
        good = (tmp_path / "tinyvae_last.pth").read_bytes()
        d = Distiller(tiny(tmp_path, epochs=2, **cfg))
        for p in d.student.decoder.parameters():  # every step of this run is NaN
            p.data.fill_(float("nan"))
        with pytest.raises(TrainingDiverged, match="non-finite 3 times in a row"):
            d.run()
        assert d.bad_steps_total == 3
        assert (tmp_path / "tinyvae_last.pth").read_bytes() == good

    def test_isolated_non_finite_step_is_skipped(self, tmp_path, teacher_file,
                                                 monkeypatch) -> None:
        original = DistillPhase.loss
        calls = {"n": 0}

        def flaky(self, module, index, x):
            terms = original(self, module, index, x)
            calls["n"] += 1
            if calls["n"] == 2:
                terms["total"] = terms["total"] * float("nan")
            return terms

        monkeypatch.setattr(DistillPhase, "loss", flaky)
        d = Distiller(tiny(tmp_path, epochs=1, teacher_checkpoint=str(teacher_file)))
        d.run()
        assert d.bad_steps_total == 1
        assert all(torch.isfinite(p).all() for p in d.student.parameters())


class TestVariants:
    def test_student_alone_needs_no_teacher(self, tmp_path) -> None:
        d = Distiller(tiny(tmp_path, epochs=1, distill_latent_weight=0, distill_recon_weight=0,
                           perceptual_weight=0))
        d.run()
        assert d.teacher is None and not (tmp_path / "teacher.pth").exists()
        assert "teacher_psnr" not in d.history[-1]["val"]

    @pytest.mark.slow
    def test_teacher_cache_matches_live_teacher(self, tmp_path, teacher_file) -> None:
        vals = []
        for cache in (True, False):
            d = Distiller(tiny(tmp_path / str(cache), epochs=1, teacher_cache=cache,
                               teacher_checkpoint=str(teacher_file)))
            d.run()
            vals.append(d.history[-1]["val"])
        # the cache stores fp16: reconstructions differ by ~1e-3, so small MSEs by ~1e-4
        for k in ("distill_latent", "distill_recon", "teacher_psnr"):
            assert vals[0][k] == pytest.approx(vals[1][k], rel=2e-2, abs=2e-4), k

    @pytest.mark.slow
    def test_finetune_freezes_encoder_first(self, tmp_path, teacher_file) -> None:
        seen = []

        class Watch(Callback):
            def on_epoch_end(self, trainer, phase, record) -> None:
                if phase.name == "finetune":
                    seen.append([p.detach().clone() for p in trainer.student.encoder.parameters()])

        d = Distiller(tiny(tmp_path, epochs=1, finetune_epochs=2,
                           teacher_checkpoint=str(teacher_file)), callbacks=[Watch()])
        d.run()
        # one distillation epoch: the best distilled student, where fine-tuning starts, is the
        # last one (tinyvae_best.pth may hold a fine-tuned student by now)
        distilled = torch.load(tmp_path / "tinyvae_last.pth")["student_state_dict"]
        names = [f"encoder.{n}" for n, _ in d.student.encoder.named_parameters()]
        assert len(names) == len(seen[0]) > 0
        assert all(torch.equal(distilled[n], b) for n, b in zip(names, seen[0], strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[1], strict=True))
        assert not (tmp_path / "tinyvae_finetune_best.pth").exists()

    def test_missing_teacher_with_zero_teacher_epochs(self, tmp_path) -> None:
        with pytest.raises(ValueError, match="teacher_epochs is 0"):
            Distiller(tiny(tmp_path, epochs=1, teacher_epochs=0)).run()


class TestInitFromData:
    @pytest.fixture
    def calls(self, monkeypatch) -> list[tuple[str, tuple[int, ...], float, float]]:
        return spy_init_from_data(monkeypatch)

    def test_fresh_models_once_resumed_never(self, full_run, calls) -> None:
        out, _, fresh_calls = full_run
        assert [c[:2] for c in fresh_calls] == [("TeacherVAE", (32, 3, 32, 32)),
                                                 ("MinimalVAE", (32, 3, 32, 32))]
        assert all(0.0 <= c[2] <= c[3] <= 1.0 for c in fresh_calls)
        d = Distiller(tiny(out, epochs=2, teacher_epochs=1), console=False)
        d.run(resume="auto")  # the finished distillation: nothing left to train
        assert calls == []  # teacher loaded from teacher.pth, student resumed
        assert d.loop is not None and d.loop.state.epoch == 2

    def test_first_images_of_the_train_split(self, tmp_path, calls, monkeypatch) -> None:
        from hrm_vision.train import trainer as splits

        monkeypatch.setattr(splits, "INIT_IMAGES", 5)
        received: list[torch.Tensor] = []
        monkeypatch.setattr(MinimalVAE, "init_from_data",
                            lambda self, images: received.append(images.clone()))
        d = Distiller(tiny(tmp_path, epochs=0, distill_latent_weight=0, distill_recon_weight=0,
                           perceptual_weight=0), console=False)
        d.run()
        expected = torch.stack([d.train_set[i][1] for i in range(5)])
        assert len(received) == 1 and torch.equal(received[0], expected)


class TestBestSelectionAndCallbacks:
    def test_best_follows_psnr_not_total_loss(self, tmp_path, monkeypatch) -> None:
        """Scripted validations where the total loss and the PSNR disagree: ``teacher.pth`` and
        ``tinyvae_best.pth`` follow the PSNR (ties keep the first epoch); a user callback is
        called and the default writers still write ``history.json`` and the checkpoints."""
        teacher_vals = iter([{"total": 1.0, "psnr": 11.0}, {"total": 2.0, "psnr": 13.0}])
        student_vals = iter([{"total": 5.0, "psnr": 20.0}, {"total": 1.0, "psnr": 12.0},
                             {"total": 3.0, "psnr": 20.0}])
        monkeypatch.setattr(TeacherPhase, "validate", lambda self: dict(next(teacher_vals)))
        monkeypatch.setattr(DistillPhase, "validate", lambda self: dict(next(student_vals)))
        ends: list[tuple[str, int]] = []

        class Count(Callback):
            def on_epoch_end(self, trainer, phase, record) -> None:
                ends.append((phase.name, record["epoch"]))

        d = Distiller(tiny(tmp_path, epochs=3, teacher_epochs=2, train_samples=16),
                      callbacks=[Count()], console=False)
        d.run()
        assert ends == [("teacher", 1), ("teacher", 2), ("distill", 1), ("distill", 2),
                        ("distill", 3)]
        assert [r["is_best"] for r in d.history] == [True, True, True, False, False]
        assert torch.load(tmp_path / "teacher.pth")["epoch"] == 2
        best = torch.load(tmp_path / "tinyvae_best.pth")
        assert (best["epoch"], best["best_psnr"]) == (1, 20.0)
        history = json.loads((tmp_path / "history.json").read_text())
        assert [(r["phase"], r["epoch"]) for r in history] == ends
        assert torch.load(tmp_path / "tinyvae_last.pth")["epoch"] == 3
