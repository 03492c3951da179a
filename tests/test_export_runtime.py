"""Inference runners: eager PyTorch tuned for inference gives the model's outputs; CUDA paths."""

from __future__ import annotations

import pytest
import torch

from hrm_vision.export import PARITY_TOLERANCE, export_model
from hrm_vision.export.runtime import chain, eager_runner, onnx_runner
from tests.helpers.models import perturbed_student

NO_CUDA = "no CUDA device on this machine: the CUDA runs are checked on a machine with a GPU"




def test_channels_last_eager_equals_the_default_path(photo_batch) -> None:
    model = perturbed_student()
    x = torch.nn.functional.interpolate(photo_batch[:2], size=(96, 128), mode="bilinear")
    with torch.no_grad():
        z = model.encode(x)
        x_hat = model.decode(z)
    enc, dec = eager_runner(model, "encode"), eager_runner(model, "decode")
    # float rounding only: the latent's range is about 12 here
    assert (enc(x) - z).abs().max() <= PARITY_TOLERANCE
    assert (dec(z) - x_hat).abs().max() <= PARITY_TOLERANCE
    assert (chain(enc, dec)(x) - x_hat).abs().max() <= PARITY_TOLERANCE
    assert enc(x).is_contiguous()
    # the caller's model is left as it was (layout and weights)
    assert all(p.is_contiguous() for p in model.parameters())
    with pytest.raises(ValueError, match="part must be"):
        eager_runner(model, "forward")


def test_onnx_runner_any_size(tmp_path) -> None:
    model = perturbed_student()
    export_model(model, tmp_path, torch.rand(2, 3, 32, 32))
    x = torch.rand(1, 3, 72, 40)
    with torch.no_grad():
        z = model.encode(x)
    assert (onnx_runner(tmp_path / "tinyvae_encoder.onnx", threads=1)(x) - z).abs().max() <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_eager_and_fp16_autocast_match_cpu(photo_batch) -> None:
    model = perturbed_student()
    with torch.no_grad():
        z = model.encode(photo_batch)
        gpu = model.cuda()
        assert (gpu.encode(photo_batch.cuda()).cpu() - z).abs().max() <= 1e-3
        with torch.autocast("cuda", dtype=torch.float16):
            z16 = gpu.encode(photo_batch.cuda()).float().cpu()
    assert (z16 - z).abs().max() <= 5e-2
