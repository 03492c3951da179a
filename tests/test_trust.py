"""The trust report on a tiny compact student: keys, ranges, the codes it writes, and each
agreement measured on cases whose answer is known."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from hrm_vision import save
from hrm_vision.cli import main
from hrm_vision.compact import CompactStudentVAE
from hrm_vision.io import model_entry, save_checkpoint
from hrm_vision.irp.sage import create_tinyvae_irp
from hrm_vision.metrics import psnr
from hrm_vision.trust import (
    CHANGES,
    agreement,
    decoder_gain,
    device_agreement,
    entity_agreement,
    unseen_crops,
    view_pairs,
)
from hrm_vision.vae import LatentAdapter

TINY = ["--num-crops", "16", "--train-crops", "520", "--gallery", "15", "--token-ids", "2"]


def student(seed: int) -> CompactStudentVAE:
    torch.manual_seed(seed)
    model = CompactStudentVAE(latent_dim=64, base_channels=2).eval()
    for p in model.parameters():  # trained-looking: the zero-initialised branches speak too
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def saved(path: Path, seed: int) -> str:
    torch.manual_seed(seed + 100)
    save(student(seed), path, adapter=LatentAdapter(64, 32, vector=True).eval())
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path, Path]:
    tmp = tmp_path_factory.mktemp("trust")
    checkpoint = tmp / "compact_best.pth"
    save_checkpoint(model_entry(student(0), "student"), checkpoint)
    out = tmp / "report"
    assert main(["trust", str(checkpoint), "--out", str(out), "--no-device", *TINY]) == 0
    return json.loads((out / "trust.json").read_text()), out, checkpoint


def test_keys_and_ranges(run) -> None:
    report, out, _ = run
    for figures in (report, report["unseen"]):
        assert set(figures["ssim"]) == set(figures["psnr"]) == {"student", "pca64", "thumbnail8"}
        assert all(0 < v <= 1 for v in figures["ssim"].values())
        assert 0 <= figures["sage_trust"]["student"] <= 1
        assert abs(figures["latent_8bit_cost_db"]) < 0.1  # 256 levels on the training range
        tokens = figures["tokens"]
        assert set(tokens["by_ids"]) == {"1", "2"} and tokens["bits_per_crop"] == 18
        assert tokens["by_ids"]["1"]["psnr"] < tokens["by_ids"]["2"]["psnr"] == tokens["psnr"]
        assert set(figures["view_agreement"]) == set(CHANGES)
        for change in figures["view_agreement"].values():
            assert all(0 <= change[k] <= 1 for k in ("student", "pca64", "pca64_whitened",
                                                      "student_decoder_units"))
        brightness = figures["view_agreement"]["brightness"]  # whitening: contrast, not level
        assert brightness["cosine_pca64_whitened"] != brightness["cosine_pca64"]
        assert set(figures["device_agreement"]) >= {"fp16", "int8"}
        assert figures["entity_agreement"] == {"distilled": {"cosine": None},
                                               "alone": {"cosine": None}}
    assert "| ssim.student |" in (out / "trust.md").read_text()


def test_written_codes_serve_the_plugin(run) -> None:
    _, out, checkpoint = run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plugin = create_tinyvae_irp(device="cpu", checkpoint=str(checkpoint),
                                    codes=str(out / "codes.safetensors"))
    crops = unseen_crops(4)
    codes, tokens = plugin.get_latents(crops, form="8bit"), plugin.get_latents(crops, form="tokens")
    assert codes.dtype == torch.uint8 and codes.shape == (4, 64)
    assert tokens.dtype == torch.int64 and tokens.shape == (4, 2)
    exact = plugin.decode_batch(plugin.get_latents(crops))
    assert psnr(plugin.decode_batch(codes), exact) > 25  # unseen crops may leave the range
    assert plugin.decode_batch(tokens).shape == (4, 3, 64, 64)


def test_view_pairs_are_the_changes_they_name() -> None:
    photo = (unseen_crops(1, 256) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    a, b = view_pairs([photo], "brightness", 6, 32)
    ratio = b.sum((1, 2, 3)) / a.sum((1, 2, 3))
    assert a.shape == b.shape == (6, 3, 32, 32)
    assert ((ratio - 1).abs() > 0.03).all() and ((ratio - 1).abs() <= 0.1 + 1e-4).all()
    a, b = view_pairs([photo], "shift", 6, 32)
    assert not torch.equal(a, b) and (a - b).abs().mean() < 0.5
    with pytest.raises(ValueError, match="change must be"):
        view_pairs([photo], "rotate", 2)


def test_agreement_finds_partners_and_misses_strangers() -> None:
    z = torch.randn(50, 8)
    assert agreement(z, z + 0.01 * torch.randn_like(z), z.mean(0)) == pytest.approx((1.0, 1.0),
                                                                                    abs=1e-3)
    cos, hit = agreement(z, torch.randn(50, 8), z.mean(0))
    assert abs(cos) < 0.3 and hit < 0.2


def test_entity_agreement_of_a_model_with_itself_and_a_stranger(tmp_path) -> None:
    a, b = saved(tmp_path / "a.safetensors", 1), saved(tmp_path / "b.safetensors", 2)
    sets, train = {"held_out": unseen_crops(8, seed=1)}, unseen_crops(16, seed=2)
    for teacher_space in (True, False):
        assert entity_agreement([a, a], sets, train, teacher_space)["held_out"] == \
            pytest.approx(1.0)
        assert entity_agreement([a, b], sets, train, teacher_space)["held_out"] < 0.9


def test_bad_inputs_are_one_line(run, tmp_path, capsys) -> None:
    _, _, checkpoint = run
    assert main(["trust", str(tmp_path / "none.pth"), "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trust", str(checkpoint), "--out", str(tmp_path), "--train-crops", "100"])
    assert not (tmp_path / "trust.json").exists()


@pytest.mark.slow
def test_device_agreement_of_the_onnx_graphs() -> None:
    model, crops = student(3), unseen_crops(8)
    with torch.no_grad():
        centre = model.encode(crops).mean(0)
    found = device_agreement(model, {"held_out": crops}, unseen_crops(32, seed=3), centre)
    for precision, floor in (("fp32", 0.99999), ("fp16", 0.999), ("int8", 0.9)):
        figures = found[precision]["held_out"]
        assert figures["cosine"] > floor and figures["max_abs"] >= 0
        assert 0 <= figures["decoded_differ"] <= 1


def test_decoder_gain_is_the_column_norm_of_a_linear_decoder() -> None:
    """For ``decode(z) = W z + b`` a unit step of number ``i`` moves the image by column ``i``
    of ``W``; for ``decode(z) = (W z)^2`` by that column times ``2 W z``, whose norm it
    averages (RMS) over ``z``."""
    weight, bias = torch.randn(48, 5), torch.randn(48)
    z = torch.randn(7, 5)
    linear = decoder_gain(lambda v: (v @ weight.T + bias).reshape(-1, 3, 4, 4), z)
    assert torch.allclose(linear, weight.norm(dim=0), rtol=1e-5)
    squared = decoder_gain(lambda v: (v @ weight.T).square(), z)
    expect = (2 * (z @ weight.T)[:, :, None] * weight[None]).square().sum(1).mean(0).sqrt()
    assert torch.allclose(squared, expect, rtol=1e-4)
