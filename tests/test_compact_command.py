"""``make compact`` (training/compact.py) end to end on a tiny config, and the pieces of its table:
the alone run's image weight, the rate arithmetic, the best epoch and the unseen-source crops."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from helpers.scripts import load_script  # tests/ is on sys.path (pytest prepend mode)

ROOT = Path(__file__).resolve().parents[1]
#: A tiny version of training/compact.json: 48 training crops, 8 validation crops, one epoch
#: per phase, tiny widths.
TINY = {"teacher_latent_dim": 32, "teacher_base_channels": 4, "student_latent_dim": 8,
        "student_base_channels": 4, "train_samples": 48, "val_samples": 8, "batch_size": 16,
        "teacher_epochs": 1, "epochs": 1, "finetune_epochs": 1, "warmup_steps": 1,
        "device": "cpu", "recon_weight": 0.25, "distill_recon_weight": 0.5}


def load_command():
    return load_script("training/compact.py", "compact_command")


COMPACT = load_command()  # the table's pieces live in the script (``make compact``)
Coder, best_epoch, compact_table = COMPACT.Coder, COMPACT.best_epoch, COMPACT.compact_table
markdown_table, unseen_crops = COMPACT.markdown_table, COMPACT.unseen_crops


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    """``main`` run in-process on the tiny config: (out-dir, printed text, compact.json)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("compact")
    config = {**json.loads((ROOT / "training/compact.json").read_text()), **TINY}
    (root / "tiny.json").write_text(json.dumps(config))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = load_command().main(["--config", str(root / "tiny.json"),
                                      "--out-dir", str(root / "out")])
    assert status == 0
    return root / "out", printed.getvalue(), json.loads((root / "out/compact.json").read_text())


class TestTinyRun:
    def test_rows_are_named_finite_and_on_both_sets(self, tiny_run) -> None:
        _, printed, report = tiny_run
        rows = {r["name"].split(" (")[0]: r for r in report["rows"]}
        for name in ("compact teacher", "compact student, distilled", "compact student, alone",
                     "cross-decoding", "crop PCA, 16 coefficients", "thumbnail 5x5, bicubic",
                     "thumbnail 8x8, bicubic"):
            assert name in rows, name
            assert set(rows[name]["psnr_db"]) == {"held_out", "unseen"}
            assert all(math.isfinite(v) and v > 5 for v in rows[name]["psnr_db"].values())
            assert f"| {rows[name]['name']} |" in printed
        # PCA-64 and PCA-256 need more than 48 training crops: left out, not made up
        assert "crop PCA, 64 coefficients" not in rows
        assert rows["compact teacher"]["numbers"] == 32 and rows["cross-decoding"]["numbers"] == 8
        for name in ("compact teacher", "compact student, distilled", "cross-decoding"):
            kl, bpp = rows[name]["kl_nats_per_number"], rows[name]["bits_per_pixel"]
            assert all(v >= 0 and math.isfinite(v) for v in (*kl.values(), *bpp.values()))
            assert bpp["held_out"] == pytest.approx(
                kl["held_out"] * rows[name]["numbers"] / (64 * 64 * math.log(2)))
        assert rows["thumbnail 5x5, bicubic"]["kl_nats_per_number"] is None
        assert rows["compact teacher"]["best_epoch"] == "teacher epoch 1 of 1"
        assert rows["compact student, distilled"]["best_epoch"].split(" epoch ")[0] in (
            "distill", "finetune")

    def test_alone_run_gets_the_distillation_image_weight_back(self, tiny_run) -> None:
        out, _, report = tiny_run
        alone = json.loads((out / "alone/config.json").read_text())
        distilled = json.loads((out / "distilled/config.json").read_text())
        assert alone["recon_weight"] == pytest.approx(0.75)
        assert alone["distill_recon_weight"] == alone["distill_latent_weight"] == 0
        assert distilled["recon_weight"] == 0.25 and distilled["distill_recon_weight"] == 0.5
        names = [r["name"] for r in report["rows"]]
        assert "compact student, alone (recon weight 0.25 + 0.5 = 0.75, no distillation)" in names

    def test_files_written(self, tiny_run) -> None:
        out, _, _ = tiny_run
        for path in ("distilled/teacher.pth", "distilled/tinyvae_best.pth",
                     "distilled/history.json", "alone/tinyvae_best.pth", "alone/history.json"):
            assert (out / path).is_file(), path
        assert not (out / "alone/teacher.pth").exists()  # nothing to distil from


def test_a_bad_budget_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_command().main(["--budget", "0"])
    assert exc.value.code == 2 and "--budget" in capsys.readouterr().err


def test_best_epoch_is_the_last_marked_one(tmp_path) -> None:
    history = [{"phase": "teacher", "epoch": 1, "is_best": True},
               {"phase": "distill", "epoch": 1, "is_best": True},
               {"phase": "distill", "epoch": 2, "is_best": False},
               {"phase": "distill", "epoch": 3, "is_best": True},
               {"phase": "finetune", "epoch": 1, "is_best": False}]
    path = tmp_path / "history.json"
    path.write_text(json.dumps(history))
    assert best_epoch(path, ("distill", "finetune")) == "distill epoch 3 of 3"
    assert best_epoch(path, ("teacher",)) == "teacher epoch 1 of 1"
    with pytest.raises(ValueError, match="no best epoch"):
        best_epoch(path, ("nope",))


def test_rate_of_a_known_posterior() -> None:
    """A posterior with mu = 1 and unit variance spends 0.5 nats per number; an identity code of
    3x8x8 images with 4 numbers spends 0.5 * 4 / (64 ln 2) bits per pixel."""
    images = torch.rand(6, 3, 8, 8)
    coder = Coder("identity", 4, lambda x: x, lambda z: z,
                  lambda x: (torch.ones(len(x), 4), torch.zeros(len(x), 4)))
    train = torch.rand(40, 3, 8, 8)
    rows = compact_table([coder], {"held_out": images}, train)
    assert rows[0]["psnr_db"]["held_out"] == math.inf or rows[0]["psnr_db"]["held_out"] > 90
    assert rows[0]["kl_nats_per_number"]["held_out"] == pytest.approx(0.5)
    assert rows[0]["bits_per_pixel"]["held_out"] == pytest.approx(2 / (64 * math.log(2)))
    table = markdown_table(rows)
    assert "| identity | 4 |" in table and "PSNR held-out (dB)" in table


def test_unseen_crops_come_from_another_photograph() -> None:
    from hrm_vision.data import PhotoCrops

    crops = unseen_crops(12, 64)
    assert tuple(crops.shape) == (12, 3, 64, 64) and 0 <= crops.min() and crops.max() <= 1
    assert torch.equal(crops, unseen_crops(12, 64))  # deterministic
    held = PhotoCrops("val", image_size=64, num_crops=12)
    assert not torch.equal(crops, held.images_uint8.float() / 255)
