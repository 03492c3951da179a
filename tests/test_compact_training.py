"""The compact pair in the trainer: model selection by registry name, the vector latent adapter,
the KL of vector latents, the compact config's budget and a tiny end-to-end distillation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from experiments.model_summary import summary_rows
from hrm_vision.compact import CompactStudentVAE, CompactTeacherVAE, fit_crop_pca
from hrm_vision.evaluate import crop_baselines
from hrm_vision.io import CheckpointError, load, model_from_payload, save
from hrm_vision.metrics import psnr
from hrm_vision.train import Distiller, load_config, trainer
from hrm_vision.train.config import ConfigError, make_config
from hrm_vision.train.loss import TeacherFeatures, kl_nats, residual_variance
from hrm_vision.train.trainer import (
    build_split,
    configured_model,
    first_images,
    first_photos,
)
from hrm_vision.vae import LatentAdapter, MinimalVAE, TeacherVAE

ROOT = Path(__file__).resolve().parents[1]
COMPACT = ROOT / "training" / "compact.json"
#: Tiny compact sizes for runs in the test suite.
TINY = {"teacher_latent_dim": 32, "teacher_base_channels": 4, "student_latent_dim": 8,
        "student_base_channels": 4}


def crops(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random 64x64 RGB crops in [0, 1], (n, 3, 64, 64)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=64, mode="bilinear", align_corners=False)


class TestModelSelection:
    def test_defaults_build_the_spatial_pair(self) -> None:
        cfg = make_config({"student_latent_dim": 8, "student_base_channels": 4,
                           "teacher_latent_dim": 16, "teacher_base_channels": 4,
                           "teacher_blocks_per_stage": 2})
        student, teacher = configured_model(cfg, "student"), configured_model(cfg, "teacher")
        assert type(student) is MinimalVAE and type(teacher) is TeacherVAE
        assert student.arch_config() == {"latent_dim": 8, "base_channels": 4}
        assert teacher.arch_config() == {"latent_dim": 16, "base_channels": 4,
                                         "blocks_per_stage": 2}

    def test_compact_names_take_the_size_fields_and_the_crop_side(self) -> None:
        cfg = make_config({"student_model": "compact_student", "teacher_model": "compact_teacher",
                           "image_size": 64, **TINY})
        student, teacher = configured_model(cfg, "student"), configured_model(cfg, "teacher")
        assert type(student) is CompactStudentVAE and type(teacher) is CompactTeacherVAE
        assert student.latent_shape() == (8,) and teacher.latent_shape() == (32,)
        assert student.arch_config()["base_channels"] == 4

    def test_unknown_and_mixed_models_are_refused(self) -> None:
        with pytest.raises(ConfigError, match="student_model"):
            make_config({"student_model": "tiny"})
        with pytest.raises(ConfigError, match="both be compact"):
            make_config({"student_model": "compact_student"})

    def test_a_compact_model_needs_its_crop_size(self) -> None:
        cfg = make_config({"student_model": "compact_student", "teacher_model": "compact_teacher",
                           "image_size": 32, **TINY})
        with pytest.raises(ValueError, match="image_size must be 64"):
            configured_model(cfg, "student")


class TestCompactConfig:
    def test_builds_the_pair_at_64_and_512_numbers_per_64x64_crop(self) -> None:
        cfg = load_config(COMPACT)
        student, teacher = configured_model(cfg, "student"), configured_model(cfg, "teacher")
        x = torch.rand(2, 3, cfg.image_size, cfg.image_size)
        assert cfg.image_size == 64
        assert tuple(student.encode(x).shape) == (2, 64)
        assert tuple(teacher.encode(x).shape) == (2, 512)
        assert 8 <= teacher.num_parameters() / student.num_parameters() <= 13

    def test_budget(self) -> None:
        """The optimizer steps of ``make compact`` (teacher, distilled student, student alone):
        its wall time on two CPU cores is documented beside the results."""
        cfg = load_config(COMPACT)
        steps_per_epoch = math.ceil(cfg.train_samples / cfg.batch_size)
        teacher = cfg.teacher_epochs * steps_per_epoch
        student = (cfg.epochs + cfg.finetune_epochs) * steps_per_epoch
        assert teacher <= 256 and 2 * student <= 512
        # the PCA start of both models needs more training crops than latent numbers
        assert cfg.train_samples > cfg.teacher_latent_dim


class TestVectorAdapter:
    def test_shapes_and_variance(self) -> None:
        adapter = LatentAdapter(8, 32, vector=True)
        var = torch.rand(5, 8)
        assert tuple(adapter(torch.randn(5, 8)).shape) == (5, 32)
        w = adapter.proj.weight
        expected = torch.stack([torch.diagonal(w @ torch.diag(v) @ w.T) for v in var])
        assert torch.allclose(adapter.variance(var), expected, atol=1e-6)

    def test_matches_the_spatial_adapter_on_a_1x1_grid(self) -> None:
        vec, grid = LatentAdapter(8, 32, vector=True), LatentAdapter(8, 32)
        with torch.no_grad():
            grid.proj.weight.copy_(vec.proj.weight[:, :, None, None])
            grid.proj.bias.copy_(vec.proj.bias)
        z, var = torch.randn(4, 8), torch.rand(4, 8)
        assert torch.allclose(vec(z), grid(z[:, :, None, None]).flatten(1), atol=1e-6)
        assert torch.allclose(vec.variance(var), grid.variance(var[:, :, None, None]).flatten(1),
                              atol=1e-6)

    def test_the_fitted_adapter_lets_the_teacher_decode_the_student(self) -> None:
        student = CompactStudentVAE(latent_dim=8, base_channels=4)
        teacher = CompactTeacherVAE(latent_dim=32, base_channels=4)
        images = crops(96)
        student.init_from_data(images)
        teacher.init_from_data(images)
        adapter = LatentAdapter(8, 32, vector=True)
        student.eval(), teacher.eval()
        with torch.no_grad():
            adapter.fit(student.encode(images), teacher.encode(images))
            x = crops(32, seed=1)  # crops the fit did not see
            own = psnr(student.decode(student.encode(x)), x)
            cross = psnr(teacher.decode(adapter(student.encode(x))), x)
            unfitted = psnr(teacher.decode(LatentAdapter(8, 32, vector=True)(
                student.encode(x))), x)
        assert abs(cross - own) < 0.1 and cross > unfitted + 0.3

    def test_checkpoint_entry_round_trip(self) -> None:
        adapter = LatentAdapter(8, 32, vector=True)
        assert adapter.arch_config() == {"student_dim": 8, "teacher_dim": 32, "vector": True}
        assert "vector" not in LatentAdapter(8, 32).arch_config()
        payload = {"adapter_state_dict": adapter.state_dict(),
                   "adapter_arch": adapter.arch_config()}
        rebuilt = model_from_payload(payload, "adapter")
        z = torch.randn(3, 8)
        assert torch.equal(rebuilt(z), adapter(z))
        payload["adapter_arch"] = {**adapter.arch_config(), "vector": 1}
        with pytest.raises(CheckpointError, match="'vector' must be true or false"):
            model_from_payload(payload, "adapter")


class TestVectorKL:
    def test_each_number_is_its_own_channel(self) -> None:
        mu, logvar = torch.randn(6, 10), torch.randn(6, 10) * 0.5
        grid = (mu[:, :, None, None], logvar[:, :, None, None])
        for free in (0.0, 0.5, 3.0):
            for mode in ("channel", "total"):
                assert torch.allclose(kl_nats(mu, logvar, free, mode), kl_nats(*grid, free, mode))
        # a floor above some channels' KL raises the value
        assert kl_nats(mu, logvar, 3.0, "channel") > kl_nats(mu, logvar, 0.0, "channel")

    def test_residual_variance_is_per_teacher_number(self) -> None:
        from hrm_vision.train.loss import TeacherTargets

        teacher = TeacherTargets(torch.randn(5, 4), torch.zeros(5, 4), torch.zeros(5, 3, 8, 8))
        adapted = torch.zeros(5, 4)
        r = residual_variance(adapted, torch.full((5, 4), 0.25), teacher)
        assert tuple(r.shape) == (1, 4)
        assert torch.allclose(r[0], teacher.mu.pow(2).mean(0) + 1.0 - 0.25)  # variances: 1, 0.25


def test_teacher_perceptual_backbone_taps_the_first_compact_stage() -> None:
    teacher = CompactTeacherVAE(latent_dim=32, base_channels=4)
    features = TeacherFeatures(teacher)(crops(2))
    assert len(features) == 1 and tuple(features[0].shape) == (2, 4, 32, 32)


def test_crop_baselines_order_and_numbers() -> None:
    train, val = crops(300), crops(40, seed=2)
    rows = {b.name: b for b in crop_baselines(val, train, coefficients=(4, 16, 64), sides=(5,))}
    pca = [rows[f"crop PCA, {k} coefficients"].psnr_db for k in (4, 16, 64)]
    assert pca == sorted(pca) and pca[0] < pca[-1]
    assert rows["thumbnail 5x5, bicubic"].numbers == 75


def test_summary_lists_the_compact_pair_at_their_crop_size() -> None:
    rows = {r["model"]: r for r in summary_rows(32)}
    assert rows["CompactStudentVAE (compact_student)"]["latent"] == "64 (64x64 crop)"
    assert rows["MinimalVAE (tinyvae)"]["latent"] == "4x4x128"


def test_tiny_compact_distillation_end_to_end(tmp_path) -> None:
    """Teacher pre-training, distillation and fine-tuning of tiny compact models on 64x64
    photos crops: the checkpoints hold the compact pair and a vector adapter, and the
    teacher's decoder reads the adapted student latent."""
    torch.set_num_threads(1)
    cfg = load_config(COMPACT, {**TINY, "train_samples": 48, "val_samples": 8,
                                "batch_size": 16, "teacher_epochs": 1, "epochs": 1,
                                "finetune_epochs": 1, "warmup_steps": 1,
                                "perceptual_weight": 0.1, "perceptual_backbone": "teacher",
                                "device": "cpu", "checkpoint_dir": str(tmp_path)})
    files = Distiller(cfg, console=False).run()
    student = load(files["best"], role="student")
    teacher = load(files["teacher"], role="teacher")
    adapter = load(files["best"], role="adapter")
    assert type(student) is CompactStudentVAE and type(teacher) is CompactTeacherVAE
    assert adapter.vector
    x = crops(3)
    with torch.no_grad():
        z = student.encode(x)
        cross = teacher.decode(adapter(z))
    assert tuple(z.shape) == (3, 8) and tuple(cross.shape) == (3, 3, 64, 64)
    history = json.loads(Path(files["history"]).read_text())
    assert [e["phase"] for e in history] == ["teacher", "distill", "finetune"]
    val = history[1]["val"]
    assert all(math.isfinite(val[k]) for k in ("psnr", "teacher_psnr", "cross_psnr", "kl"))
    assert val["perceptual"] > 0 and val["distill_latent"] > 0
    # The distilled student started in the teacher's coordinates (the basis is not trained).
    assert torch.equal(student.encoder.basis.components, teacher.encoder.basis.components[:8])


def test_a_student_alone_fits_its_own_start_beside_a_teacher(tmp_path) -> None:
    """Without distillation terms a given teacher is not the student's start."""
    torch.set_num_threads(1)
    teacher = CompactTeacherVAE(latent_dim=32, base_channels=4)
    teacher.init_from_data(crops(100))  # other crops than the student's
    path = save(teacher, tmp_path / "teacher.safetensors")
    cfg = load_config(COMPACT, {**TINY, "train_samples": 48, "val_samples": 8,
                                "batch_size": 16, "epochs": 1, "finetune_epochs": 0,
                                "warmup_steps": 1, "device": "cpu", "teacher_checkpoint": str(path),
                                "distill_latent_weight": 0.0, "distill_recon_weight": 0.0,
                                "perceptual_weight": 0.0, "checkpoint_dir": str(tmp_path)})
    student = load(Distiller(cfg, console=False).run()["best"], role="student")
    _, comps, _ = fit_crop_pca(first_images(build_split(cfg, "train")), 8)
    assert torch.allclose(student.encoder.basis.components, comps, atol=1e-5)
    assert not torch.allclose(comps, teacher.encoder.basis.components[:8], atol=1e-2)


@pytest.mark.parametrize("crops", ["fixed", "stream"])
def test_the_saved_adapter_is_the_least_squares_map_of_the_saved_student(
        tmp_path, monkeypatch, crops) -> None:
    """After each epoch the adapter is refitted to the weights that are validated and saved
    (the weight average), so a checkpoint's adapter reads its own student's latents; of
    streamed crops, with the photograph each crop is cut from."""
    torch.set_num_threads(1)
    monkeypatch.setattr(trainer, "INIT_IMAGES", 96)
    cfg = load_config(COMPACT, {**TINY, "train_samples": 48, "val_samples": 8,
                                "batch_size": 16, "teacher_epochs": 1, "epochs": 2,
                                "finetune_epochs": 0, "warmup_steps": 1, "device": "cpu",
                                "crops": crops, "checkpoint_dir": str(tmp_path)})
    files = Distiller(cfg, console=False).run()
    student, saved = load(files["best"], role="student"), load(files["best"], role="adapter")
    teacher = load(files["teacher"], role="teacher")
    split = build_split(cfg, "train")
    x = first_images(split)
    photos = first_photos(split)
    assert (photos is None) == (crops == "fixed")
    refit, plain, start = (LatentAdapter(saved.student_dim, saved.teacher_dim, vector=True)
                           for _ in range(3))
    with torch.no_grad():
        refit.fit(student.encode(x), teacher.encode(x), photos)
        plain.fit(student.encode(x), teacher.encode(x))
        fresh = CompactStudentVAE(**student.arch_config())
        fresh.init_from_data(x, teacher)  # the student's start
        start.fit(fresh.encode(x), teacher.encode(x), photos)
    assert torch.allclose(saved.proj.weight, refit.proj.weight, atol=1e-4)
    assert not torch.allclose(saved.proj.weight, start.proj.weight, atol=1e-3)
    if crops == "stream":  # the photographs shrink what only some of them hold
        assert not torch.allclose(saved.proj.weight, plain.proj.weight, atol=1e-3)
