"""The evaluation (:mod:`hrm_vision.evaluate`): the command's report of teacher against student,
and its measurements: footprint, timing, quality, rate, baselines, camera-resolution speed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from hrm_vision import cli
from hrm_vision.evaluate import (
    OPS,
    PatchPCA,
    camera_lines,
    camera_speed,
    command,
    compute_baselines,
    conv_reference,
    dequantize_uint8,
    figure_rows,
    held_out_frames,
    measure_rate,
    patch_spectrum,
    quantize_uint8,
    thumbnail,
    weight_file_bytes,
)
from hrm_vision.export import chain, eager_runner
from hrm_vision.io import model_entry, save_checkpoint
from hrm_vision.metrics import psnr as pooled_psnr
from hrm_vision.timing import interleaved_timings
from hrm_vision.vae import LatentAdapter, MinimalVAE, TeacherVAE, count_macs


def main(argv: list[str]) -> int:
    """The command as ``hrm-vision evaluate`` runs it (expected failures: one line, status 2)."""
    return cli.run_main("hrm-vision evaluate", command, argv)


MODEL_KEYS = ["parameters", "weights_fp32_bytes", "weights_fp16_bytes", "psnr_db", "ssim",
              *[f"macs_{op}" for op in OPS],
              *[f"latency_{op}_{s}_ms" for op in OPS for s in ("median", "p90")],
              *[f"throughput_{op}_ips" for op in OPS]]
TINY_RUN = ["--num-images", "6", "--batch-size", "4", "--latency-repeats", "2",
            "--throughput-repeats", "2", "--throughput-batch", "4", "--warmup", "1",
            "--baseline-train-images", "64"]


def write_tiny_checkpoints(folder: Path) -> tuple[TeacherVAE, MinimalVAE]:
    teacher = TeacherVAE(latent_dim=16, base_channels=8, blocks_per_stage=1)
    student = MinimalVAE(latent_dim=8, base_channels=8)
    adapter = LatentAdapter(8, 16)
    save_checkpoint(model_entry(teacher, "teacher"), folder / "teacher.pth")
    save_checkpoint({**model_entry(student, "student"),
                     "adapter_state_dict": adapter.state_dict(),
                     "adapter_arch": adapter.arch_config()}, folder / "tinyvae_best.pth")
    return teacher, student


def _all_finite(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_all_finite(v) for v in obj)
    if isinstance(obj, bool | str) or obj is None:
        return obj is not None
    return math.isfinite(obj)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, TeacherVAE, MinimalVAE]:
    """One tiny evaluation run: (evaluation.json contents, output folder, models)."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("evaluation")
    teacher, student = write_tiny_checkpoints(root)
    assert main(["--checkpoint-dir", str(root), "--out-dir", str(root / "out"), *TINY_RUN]) == 0
    return json.loads((root / "out" / "evaluation.json").read_text()), root / "out", \
        teacher, student


class TestEvaluationCommand:
    def test_json_has_every_field_finite(self, run) -> None:
        report = run[0]
        for role in ("teacher", "student"):
            assert sorted(report[role]) == sorted(MODEL_KEYS)
        assert sorted(report["ratios"]) == sorted(MODEL_KEYS)
        assert set(report["alignment"]) == {"cka_adapted", "cka_unadapted", "cross_psnr_db"}
        assert {"psnr_float_db", "psnr_uint8_db", "psnr_cost_db", "ssim_uint8", "scheme",
                "bytes_float32", "bytes_uint8"} <= set(report["latent_uint8"])
        assert "goals" not in report  # measurements only, no acceptance thresholds
        assert _all_finite(report), "every value must be present and finite"
        assert report["frames"] is not None  # the photos dataset has held-out photographs

    def test_values_describe_the_models(self, run) -> None:
        report, _, teacher, student = run
        assert report["teacher"]["parameters"] == teacher.num_parameters()
        assert report["student"]["parameters"] == student.num_parameters()
        assert report["ratios"]["parameters"] == pytest.approx(
            teacher.num_parameters() / student.num_parameters())
        assert report["ratios"]["psnr_db"] == pytest.approx(
            report["student"]["psnr_db"] / report["teacher"]["psnr_db"])
        assert report["dataset"]["num_images"] == 6
        assert report["latent_uint8"]["bytes_float32"] == 4 * 8 * 4 * 4
        for role in ("teacher", "student"):
            m = report[role]
            assert m["latency_both_p90_ms"] >= m["latency_both_median_ms"] > 0
            assert m["weights_fp16_bytes"] < m["weights_fp32_bytes"]
            assert 0 < m["ssim"] <= 1
        assert 0 <= report["alignment"]["cka_adapted"] <= 1 + 1e-9
        assert report["alignment"]["cross_psnr_db"] > 0
        assert "teacher decoder on the adapted student latent" in (run[1] / "evaluation.md"
                                                                    ).read_text()

    def test_baselines_on_the_same_images(self, run) -> None:
        report, out, teacher, student = run
        rows = {r["name"]: r for r in report["reconstructions"]}
        assert rows["student"]["numbers"] == 8 * 4 * 4 and rows["teacher"]["numbers"] == 16 * 16
        assert rows["student"]["psnr_db"] == report["student"]["psnr_db"]
        pca = [r for name, r in rows.items() if name.startswith("patch PCA")]
        thumbs = [r for name, r in rows.items() if name.startswith("thumbnail")]
        assert len(pca) >= 2 and len(thumbs) >= 1
        assert pca[-1]["psnr_db"] > pca[0]["psnr_db"]  # more coefficients, better
        assert "| patch PCA" in (out / "evaluation.md").read_text()

    def test_rate_rows_for_every_model_on_crops_and_frames(self, run) -> None:
        report, out, teacher, student = run
        for rows, label in ((report["rate"], "32x32 crops"), (report["frames"]["rate"], "frames")):
            assert [r["model"] for r in rows] == ["teacher", "student"]
            for r, model in zip(rows, (teacher, student), strict=True):
                assert r["images"] == label and r["latent_channels"] == model.latent_dim
                # bits per pixel: nats per element x channels per 64 pixels, in bits
                assert r["bits_per_pixel"] == pytest.approx(
                    r["kl_nats_per_element"] * model.latent_dim / (64 * math.log(2)))
                # the best linear-Gaussian code never does worse than the uniform allocation
                assert r["water_filling_psnr_db"] >= r["uniform_psnr_db"]
        crops = {r["model"]: r for r in report["rate"]}
        assert crops["student"]["psnr_mu_db"] == pytest.approx(report["student"]["psnr_db"])
        table = (out / "evaluation.md").read_text()
        assert "| student | 32x32 crops |" in table and "| student | frames |" in table

    def test_frames_are_the_held_out_photographs_with_the_pca_start(self, run) -> None:
        frames = run[0]["frames"]
        assert [p["name"] for p in frames["photos"]] == ["coffee", "rocket", "camera"]
        assert all(p["height"] % 8 == 0 and p["width"] % 8 == 0 for p in frames["photos"])
        rows = {r["name"]: r for r in frames["reconstructions"]}
        assert {"teacher", "student", "patch PCA, 128 coefficients"} <= set(rows)
        assert rows["patch PCA, 128 coefficients"]["numbers"] == 128
        assert rows["patch PCA, 192 coefficients"]["psnr_db"] > rows[
            "patch PCA, 16 coefficients"]["psnr_db"]
        assert "Held-out photographs at full resolution" in (run[1] / "evaluation.md"
                                                              ).read_text()

    def test_frames_can_be_left_out(self, tmp_path: Path) -> None:
        write_tiny_checkpoints(tmp_path)
        assert main(["--checkpoint-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"),
                     *TINY_RUN, "--baseline-train-images", "0", "--no-frames"]) == 0
        report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
        assert report["frames"] is None and len(report["rate"]) == 2
        assert [r["name"] for r in report["reconstructions"]] == ["teacher", "student"]

    def test_markdown_and_png_written(self, run) -> None:
        report, out, _, _ = run
        table = (out / "evaluation.md").read_text()
        assert "| parameters |" in table and f"{report['teacher']['parameters']:,}" in table
        assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_missing_teacher_is_a_clear_error(self, tmp_path: Path, capsys) -> None:
        write_tiny_checkpoints(tmp_path)
        (tmp_path / "teacher.pth").unlink()
        assert main(["--checkpoint-dir", str(tmp_path), *TINY_RUN]) == 2
        err = capsys.readouterr().err
        assert "checkpoint not found" in err and "teacher.pth" in err and "Traceback" not in err

    def test_bad_option_is_a_usage_error(self, tmp_path: Path, capsys) -> None:
        with pytest.raises(SystemExit) as info:
            main(["--checkpoint-dir", str(tmp_path), "--latency-repeats", "0"])
        assert info.value.code == 2
        assert "--latency-repeats must be >= 1" in capsys.readouterr().err

    def test_help_names_the_command(self, capsys) -> None:
        with pytest.raises(SystemExit) as info:
            cli.main(["evaluate", "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: hrm-vision evaluate") and "--checkpoint-dir" in out


class TestWeightFiles:
    def test_fp16_file_is_about_half_of_fp32(self) -> None:
        model = MinimalVAE()
        ratio = weight_file_bytes(model, torch.float16) / weight_file_bytes(model, torch.float32)
        assert 0.48 < ratio < 0.55

    def test_file_grows_with_parameters(self) -> None:
        small, big = MinimalVAE(8, 8), MinimalVAE(16, 16)
        assert weight_file_bytes(big) > weight_file_bytes(small)

    def test_integer_dtype_refused(self) -> None:
        with pytest.raises(ValueError, match="floating"):
            weight_file_bytes(MinimalVAE(8, 8), torch.int8)


class TestUint8Latent:
    def test_round_trip_error_within_half_a_step(self) -> None:
        z = torch.randn(3, 8, 4, 4) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1, 1, 1)
        q, low, scale = quantize_uint8(z)
        assert q.dtype == torch.uint8 and low.shape == scale.shape == (3, 1, 1, 1)
        err = (dequantize_uint8(q, low, scale) - z).abs().flatten(1).max(1).values
        assert torch.all(err <= scale.flatten() / 2 + 1e-6)
        assert q.min() == 0 and q.max() == 255

    def test_constant_latent_is_exact(self) -> None:
        z = torch.full((2, 4, 2, 2), 0.7)
        assert torch.equal(dequantize_uint8(*quantize_uint8(z)), z)


class TestInterleavedTimings:
    def test_each_function_timed_and_order_rotates(self) -> None:
        calls: list[str] = []
        fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
        times = interleaved_timings(fns, repeats=3, warmup=1)
        assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
        rounds = [calls[i:i + 3] for i in range(3, 12, 3)]  # after the warmup round
        assert [r[0] for r in rounds] == ["a", "b", "c"]
        assert all(sorted(r) == ["a", "b", "c"] for r in rounds)

    def test_bad_repeats(self) -> None:
        with pytest.raises(ValueError, match="repeats"):
            interleaved_timings({"a": lambda: None}, repeats=0)


def test_figure_rows_add_the_students_error() -> None:
    x = torch.rand(4, 3, 8, 8)
    student = (x + 0.01).clamp(0, 1)
    rows = figure_rows({"inputs": x, "teacher": x, "student": student})
    assert [label for label, _ in rows] == ["inputs", "teacher", "student", "error x10"]
    assert torch.allclose(rows[-1][1], ((student - x).abs() * 10).clamp(0, 1))
    assert [label for label, _ in figure_rows({"inputs": x})] == ["inputs"]


class TestRate:
    def _model(self) -> MinimalVAE:
        torch.manual_seed(0)
        model = MinimalVAE(latent_dim=8, base_channels=8)
        return model.eval()

    def test_decode_of_a_sample_is_seeded_and_noisier_than_the_mean(self, photo_batch) -> None:
        model, spectrum = self._model(), patch_spectrum(photo_batch)
        a, b = (measure_rate(model, "student", photo_batch, "crops", spectrum, seed=s)
                for s in (0, 1))
        again = measure_rate(model, "student", photo_batch, "crops", spectrum, seed=0)
        assert again.psnr_sample_db == a.psnr_sample_db != b.psnr_sample_db
        assert a.psnr_mu_db == b.psnr_mu_db > a.psnr_sample_db
        with torch.no_grad():
            mu, logvar = model.posterior(photo_batch)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        assert a.kl_nats_per_element == pytest.approx(float(kl), rel=1e-5)

    def test_frames_in_batches_of_one_give_the_set_value(self, photo_batch) -> None:
        model, spectrum = self._model(), patch_spectrum(photo_batch)
        whole = measure_rate(model, "s", photo_batch, "crops", spectrum, batch_size=16)
        frames = measure_rate(model, "s", list(photo_batch.split(1)), "crops", spectrum)
        assert frames.psnr_mu_db == pytest.approx(whole.psnr_mu_db, abs=1e-4)
        assert frames.kl_nats_per_element == pytest.approx(whole.kl_nats_per_element, rel=1e-5)
        assert patch_spectrum(list(photo_batch.split(4))) == pytest.approx(spectrum)

    def test_held_out_frames_have_sides_divisible_by_8(self) -> None:
        frames = held_out_frames(["coffee"])
        assert len(frames) == 1 and frames[0].shape[:2] == (1, 3)
        assert frames[0].shape[-2] % 8 == 0 and frames[0].shape[-1] % 8 == 0
        assert 0 <= float(frames[0].min()) and float(frames[0].max()) <= 1
        assert frames[0].shape[-2] > 300  # full resolution, not a crop


# ---------------------------------------------------------------------------------- baselines
def test_pooled_psnr_is_over_the_whole_set() -> None:
    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    pred[0] = 0.1  # image 0 has MSE 0.01, image 1 is exact: pooled MSE 0.005
    assert pooled_psnr(pred, target) == pytest.approx(-10 * torch.log10(torch.tensor(0.005)))


def test_thumbnail_keeps_a_smooth_image_and_loses_detail() -> None:
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32).contiguous()
    assert pooled_psnr(thumbnail(ramp, 16), ramp) > 35
    checker = ((torch.arange(32)[:, None] + torch.arange(32)) % 2).float().expand(1, 3, 32, 32)
    assert pooled_psnr(thumbnail(checker, 16), checker) < 10


def test_pca_error_falls_with_k_and_is_exact_with_all(photo_batch) -> None:
    pca = PatchPCA(photo_batch)
    scores = [pooled_psnr(pca.reconstruct(photo_batch, k), photo_batch) for k in (4, 16, 64)]
    assert scores[0] < scores[1] < scores[2]
    assert torch.allclose(pca.reconstruct(photo_batch, 192), photo_batch, atol=1e-4)
    with pytest.raises(ValueError, match="k must be"):
        pca.reconstruct(photo_batch, 193)


def test_compute_baselines_counts_numbers(photo_batch) -> None:
    rows = {b.name: b for b in compute_baselines(photo_batch, PatchPCA(photo_batch), sides=(8,),
                                                 coefficients=(16,))}
    assert rows["thumbnail 8x8, bicubic"].numbers == 192
    assert rows["patch PCA, 16 coefficients"].numbers == 256
    # on these crops the 16-coefficient PCA beats the 8x8 thumbnail (it keeps more numbers)
    assert rows["patch PCA, 16 coefficients"].psnr_db > rows["thumbnail 8x8, bicubic"].psnr_db


# ----------------------------------------------------------------------- camera resolution
def test_rows_for_every_size_and_runner_with_consistent_units() -> None:
    model = MinimalVAE(latent_dim=8, base_channels=8).eval()
    runners = {"eager": lambda x: model.decode(model.encode(x)),
               "channels_last": chain(eager_runner(model, "encode"),
                                      eager_runner(model, "decode"))}
    result = camera_speed(model, runners, ((32, 32), (48, 64)), repeats=2)
    assert list(result) == ["32x32", "48x64"]
    for size, row in result.items():
        h, w = map(int, size.split("x"))
        assert set(row) == {"eager", "channels_last", "conv3x3_64"}
        conv = row["conv3x3_64"]["gflops"]
        for name in runners:
            r = row[name]
            assert r["fps"] == pytest.approx(1e3 / r["median_ms"])
            assert r["gflops"] == pytest.approx(
                2 * count_macs(model, h, w, "both") / r["median_ms"] / 1e6)
            assert r["fraction_of_conv"] == pytest.approx(r["gflops"] / conv)
    table = "\n".join(camera_lines(result, threads=1))
    assert "| 48x64 | channels_last |" in table and "3x3 conv, reference" in table


def test_reference_convolution_flops() -> None:
    fn, flops = conv_reference(480, 640)
    assert fn().shape == (1, 64, 120, 160)
    assert flops == 2 * 64 * 64 * 9 * 120 * 160
    assert conv_reference(16, 16)[0]().shape[-2:] == torch.Size([8, 8])  # at least 8x8
