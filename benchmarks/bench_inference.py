"""Inference at batch 64 on CPU: teacher vs student (eager), student eager vs ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hrm_vision.export import export_model, ort_session, run_onnx

ROUNDS = {"teacher": 8, "student": 30}


@pytest.mark.parametrize("op", ["encode", "decode"])
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_eager(benchmark, models, images, role: str, op: str) -> None:
    """``model.encode(images)`` or ``model.decode(latent)``; group ``eager {op} b64``."""
    model = models[role]
    benchmark.group = f"eager {op} b64"
    with torch.inference_mode():
        arg = images if op == "encode" else model.encode(images)
        fn = getattr(model, op)
        out = benchmark.pedantic(fn, args=(arg,), rounds=ROUNDS[role], warmup_rounds=2)
    assert out.shape[0] == images.shape[0]


@pytest.fixture(scope="module")
def onnx_student(models, images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The student exported (BatchNorm folded, parity-checked) into a temporary folder."""
    out = tmp_path_factory.mktemp("onnx")
    export_model(models["student"], out, images[:8], source="benchmark")
    return out


@pytest.mark.parametrize("runtime", ["pytorch-eager", "onnxruntime"])
def test_student_runtime(benchmark, models, images, onnx_student: Path, runtime: str) -> None:
    """Student encode+decode at batch 64; group ``student encode+decode b64``."""
    benchmark.group = "student encode+decode b64"
    if runtime == "onnxruntime":
        enc = ort_session(onnx_student / "tinyvae_encoder.onnx", threads=torch.get_num_threads())
        dec = ort_session(onnx_student / "tinyvae_decoder.onnx", threads=torch.get_num_threads())

        def fn() -> torch.Tensor:
            return run_onnx(dec, run_onnx(enc, images))
    else:
        model = models["student"]

        @torch.inference_mode()
        def fn() -> torch.Tensor:
            return model.decode(model.encode(images))
    out = benchmark.pedantic(fn, rounds=30, warmup_rounds=3)
    assert out.shape == images.shape
