"""``make learn`` (benchmarks/learn.py) end to end on a tiny generated corpus: the four runs,
learn.json's keys, the curves, the table's baselines, a rerun that skips finished runs, and the
shipped weights loading by name with the PSNR their sidecar records."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from helpers.scripts import load_script  # tests/ is on sys.path (pytest prepend mode)

import hrm_vision.io as io_module
import hrm_vision.train.trainer as trainer

#: A tiny benchmarks/learn.json: 64x64 compact crops, 16x16 spatial crops, tiny widths, a few
#: steps in two validations per run.
TINY_COMPACT = {"image_size": 64, "val_samples": 8, "crops": "stream", "unseen_dataset": "photos",
                "teacher_model": "compact_teacher", "student_model": "compact_student",
                "teacher_latent_dim": 8, "teacher_base_channels": 4, "student_latent_dim": 4,
                "student_base_channels": 4, "batch_size": 8, "warmup_steps": 1,
                "perceptual_weight": 0.0, "device": "cpu", "recon_weight": 0.25,
                "distill_recon_weight": 0.5}
TINY_SPATIAL = {"image_size": 16, "val_samples": 8, "crops": "stream", "unseen_dataset": "photos",
                "student_model": "tinyvae", "student_latent_dim": 4, "student_base_channels": 4,
                "batch_size": 8, "warmup_steps": 1, "distill_latent_weight": 0.0,
                "distill_recon_weight": 0.0, "perceptual_weight": 0.0, "device": "cpu"}
STEPS = {"teacher": 4, "student": 4, "spatial": 2}


def load_learn():
    return load_script("benchmarks/learn.py", "learn_command")


LEARN = load_learn()


def write_corpus(root: Path) -> Path:
    """A corpus as benchmarks/corpus.py lays it out: 4 training and 2 held-out pictures (smooth
    colour fields with noise, 72x96), a licence and the manifest."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for split, count in (("train", 4), ("val", 2)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            yy, xx = np.mgrid[0:72, 0:96] / 96.0
            base = np.stack([np.sin(6 * xx * (i + 1) + c) * np.cos(4 * yy + c) for c in range(3)],
                            -1)
            pixels = 127 + 100 * base + rng.normal(0, 10, base.shape)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / f"{i}.png")
            images.append({"file": f"{split}/{i}.png", "package": "walls", "split": split,
                           "group": f"{split}{i}"})
    (root / "licenses").mkdir()
    (root / "licenses/walls.copyright").write_text("Files: *\nLicense: CC-BY-SA-4.0\n")
    manifest = {"max_side": 1600, "images": images,
                "packages": {"walls": {"version": "1.0", "license": "licenses/walls.copyright"}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def call(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in-process with downloading made an error: (status, printed text)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), mock.patch.object(
            sys.modules["corpus"], "download", side_effect=AssertionError("no downloads")):
        status = load_learn().main(argv)
    return status, printed.getvalue()


#: Streamed crops each run's models start from (``init_from_data``) and its likelihood scale
#: is calibrated on: more than the teacher's 8 latent numbers, far fewer than the trainer's
#: 4,096 (whose 4096x4096 Gram matrices made the fixture take about two minutes).
INIT_IMAGES = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny ``make learn`` run: its folders, printed text and learn.json."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("learn")
    corpus = write_corpus(root / "corpus")
    config = {"corpus": str(corpus), "out_dir": str(root / "out"), "steps": STEPS,
              "validations": 2, "pca_crops": 64, "threads": 1, "run_threads": {"spatial": 2},
              "compact": TINY_COMPACT, "teacher": {"learning_rate": 2e-4}, "spatial": TINY_SPATIAL}
    (root / "learn.json").write_text(json.dumps(config))
    seen: dict[str, int] = {}
    run = LEARN.Distiller.run

    def spy(self, *args, **kwargs):  # the torch threads each run trains on
        seen[Path(self.config.checkpoint_dir).name] = torch.get_num_threads()
        return run(self, *args, **kwargs)

    with mock.patch.object(trainer, "INIT_IMAGES", INIT_IMAGES), \
            mock.patch.object(LEARN.Distiller, "run", spy):
        status, printed = call(["--config", str(root / "learn.json"), "--scale", "1"])
    assert status == 0, printed
    return {"root": root, "out": root / "out", "printed": printed, "threads_seen": seen,
            "threads_after": torch.get_num_threads(),
            "learn": json.loads((root / "out/learn.json").read_text())}


def test_every_run_is_recorded_with_its_checkpoint_and_speed(tiny) -> None:
    learn = tiny["learn"]
    assert sorted(learn["checkpoints"]) == sorted(LEARN.RUNS)
    assert all(Path(p).is_file() for p in learn["checkpoints"].values())
    assert learn["checkpoints"]["teacher"].endswith("teacher/teacher.pth")
    expect = {"teacher": STEPS["teacher"], "distilled": STEPS["student"],
              "alone": STEPS["student"], "spatial": STEPS["spatial"]}
    assert {k: r["steps"] for k, r in learn["runs"].items()} == expect
    assert all(r["steps_per_s"] > 0 and r["wall_s"] >= r["train_s"] > 0
               for r in learn["runs"].values())


def test_each_run_trains_on_its_threads_and_the_evaluation_on_the_default(tiny) -> None:
    expect = {"teacher": 1, "distilled": 1, "alone": 1, "spatial": 2}
    assert tiny["threads_seen"] == expect
    assert {k: r["threads"] for k, r in tiny["learn"]["runs"].items()} == expect
    assert tiny["threads_after"] == 1


def test_the_alone_run_has_the_image_weight_and_no_distillation(tiny) -> None:
    alone = json.loads((tiny["out"] / "alone/config.json").read_text())
    distilled = json.loads((tiny["out"] / "distilled/config.json").read_text())
    assert alone["recon_weight"] == pytest.approx(0.75)
    assert alone["distill_latent_weight"] == alone["distill_recon_weight"] == 0.0
    assert distilled["teacher_checkpoint"] == tiny["learn"]["checkpoints"]["teacher"]
    assert alone["crops"] == distilled["crops"] == "stream"


def test_the_teacher_fields_apply_to_the_teacher_run_only(tiny) -> None:
    rates = {name: json.loads((tiny["out"] / name / "config.json").read_text())["learning_rate"]
             for name in ("teacher", "distilled", "alone")}
    assert rates["teacher"] == 2e-4
    assert rates["distilled"] == rates["alone"] != 2e-4


def test_the_table_puts_the_models_beside_pca_and_thumbnails(tiny) -> None:
    rows = {r["name"]: r for r in tiny["learn"]["rows"]}
    assert {"compact teacher", "compact student, distilled", "compact student, alone",
            "crop PCA, 16 coefficients", "thumbnail 5x5, bicubic",
            "thumbnail 8x8, bicubic"} <= set(rows)
    assert "crop PCA, 64 coefficients" not in rows  # needs more than pca_crops=64 crops
    assert all(sorted(r["psnr_db"]) == ["held_out", "unseen"]
               and all(math.isfinite(v) for v in r["psnr_db"].values()) for r in rows.values())
    spatial = tiny["learn"]["spatial_rows"]
    assert [r["name"] for r in spatial] == ["spatial student (TinyVAE, 4 channels)",
                                            "patch PCA, 128 coefficients"]
    assert [r["numbers"] for r in spatial] == [4 * 2 * 2, 128 * 2 * 2]  # per 2x2 latent cells
    assert "| compact student, distilled |" in tiny["printed"]
    assert Path(tiny["learn"]["curves"]).is_file()


def test_the_table_measures_the_best_checkpoint_on_the_trainers_sets(tiny) -> None:
    """Each model's PSNR in the table is its run's best validation record (held-out ``psnr``,
    ``unseen_psnr``): the benchmark reads the checkpoint chosen on held-out, on the same crops."""
    learn = tiny["learn"]
    rows = {r["name"]: r for r in learn["rows"]}
    rows["spatial"] = learn["spatial_rows"][0]
    for run, name in (("teacher", "compact teacher"), ("distilled", "compact student, distilled"),
                      ("alone", "compact student, alone"), ("spatial", "spatial")):
        history = json.loads(Path(learn["runs"][run]["history"]).read_text())
        best = [r for r in history if r["is_best"]][-1]["val"]
        assert rows[name]["psnr_db"]["held_out"] == pytest.approx(best["psnr"], abs=0.01), run
        assert rows[name]["psnr_db"]["unseen"] == pytest.approx(best["unseen_psnr"], abs=0.01)


def test_the_targets_are_measured_from_the_table(tiny) -> None:
    learn = tiny["learn"]
    rows = {r["name"]: r["psnr_db"] for r in learn["rows"]}
    found = {c["name"]: c for c in learn["criteria"]}
    gap = found["teacher - distilled student, unseen (dB)"]
    expect = rows["compact teacher"]["unseen"] - rows["compact student, distilled"]["unseen"]
    assert gap["value"] == pytest.approx(expect) and gap["met"] == (expect >= 3.0)
    assert "distilled student - crop PCA-64, held-out (dB)" not in found  # no PCA-64 fitted
    assert all(c["met"] == (c["value"] is not None and (c["value"] <= c["target"] if "share"
               in c["name"] else c["value"] >= c["target"])) for c in learn["criteria"])
    assert "- teacher - distilled student, held-out (dB): " in tiny["printed"]


def test_a_rerun_skips_finished_runs_and_ships_by_name(tiny, monkeypatch) -> None:
    times = {k: Path(p).stat().st_mtime_ns for k, p in tiny["learn"]["checkpoints"].items()}
    weights = tiny["root"] / "weights"
    status, printed = call(["--config", str(tiny["root"] / "learn.json"), "--scale", "1",
                            "--ship", "--weights-dir", str(weights)])
    assert status == 0, printed
    assert all(f"{name}: done" in printed for name in LEARN.RUNS), printed
    assert {k: Path(p).stat().st_mtime_ns
            for k, p in tiny["learn"]["checkpoints"].items()} == times
    monkeypatch.setattr(io_module, "WEIGHTS_DIR", weights)
    monkeypatch.chdir(tiny["root"])
    assert io_module.shipped_weights() == ["compact_student", "tinyvae"]
    config = LEARN.run_configs(LEARN.learn_config(str(tiny["root"] / "learn.json")), 1.0,
                               tiny["root"] / "corpus", tiny["out"])
    for name, run in (("compact_student", None), ("tinyvae", "spatial")):
        record = json.loads((weights / f"{name}.json").read_text())
        assert record["storage"] in ("float16", "float32") and record["role"] == "student"
        assert record["trained_on"]["packages"]["walls"]["licenses"] == ["CC-BY-SA-4.0"]
        model = io_module.load(name)
        sets, _ = LEARN.evaluation_sets(config[run or record["run"]], 2)
        for key, x in sets.items():  # the shipped file reproduces the PSNR it records
            assert LEARN.decoded_psnr(model.encode, model.decode, x) == pytest.approx(
                record["psnr_db"][key], abs=1e-4)


def test_a_bad_config_is_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"corpus": "c", "out_dir": "o", "steps": {"teachr": 3},
                               "validations": 1, "pca_crops": 8, "threads": 1, "compact": {},
                               "spatial": {}}))
    assert load_learn().main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "teachr" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_threads_of_an_unknown_run_are_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"corpus": "c", "out_dir": "o", "steps": STEPS, "validations": 1,
                               "pca_crops": 8, "threads": 1, "run_threads": {"spatail": 1},
                               "compact": {}, "spatial": {}}))
    assert load_learn().main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "spatail" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_built_corpus_is_kept_and_a_broken_one_is_not(tmp_path) -> None:
    """benchmarks/corpus.py builds again only when its manifest, images (in their split's
    folder) or licences are not all there, or were made with other settings."""
    corpus = sys.modules["corpus"]
    root = write_corpus(tmp_path / "c")
    manifest = json.loads((root / "manifest.json").read_text())
    assert corpus.built(root, 1600, ("walls",)) == manifest
    assert corpus.built(root, 800, ("walls",)) is None
    assert corpus.built(root, 1600, corpus.PACKAGES) is None
    (root / "val/1.png").rename(root / "1.png")  # the layout before train/ and val/
    manifest["images"][-1]["file"] = "1.png"
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert corpus.usable(root) is None and corpus.built(root, 1600, ("walls",)) is None


def test_a_signal_is_one_line_and_the_run_continues_on_rerun(tmp_path, capsys) -> None:
    """SIGTERM mid-run: the trainer saved its state; the benchmark says so in one line, exits
    143 and writes no table (a rerun of the same command resumes)."""
    corpus = write_corpus(tmp_path / "corpus")
    config = {"corpus": str(corpus), "out_dir": str(tmp_path / "out"), "steps": STEPS,
              "validations": 2, "pca_crops": 64, "threads": 1, "compact": TINY_COMPACT,
              "spatial": TINY_SPATIAL}
    (tmp_path / "learn.json").write_text(json.dumps(config))
    learn = load_learn()
    stop = trainer.TrainingInterrupted("SIGTERM", tmp_path / "out/teacher/teacher_last.pth")
    with mock.patch.object(learn, "train", side_effect=stop):
        assert learn.main(["--config", str(tmp_path / "learn.json"), "--scale", "1"]) == 143
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SIGTERM" in err and "rerun the same command" in err
    assert not (tmp_path / "out/learn.json").exists()
