"""The student's speed at camera resolution against this machine's convolution throughput."""

from __future__ import annotations

import pytest
import torch

from hrm_vision.evaluation.speed import camera_lines, camera_speed, conv_reference
from hrm_vision.export.runtime import chain, eager_runner
from hrm_vision.vae import MinimalVAE, count_macs


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
