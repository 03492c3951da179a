"""``hrm-vision export`` on a compact student checkpoint: ONNX encoder and decoder with a
fixed 64x64 crop and a (B, latent_dim) latent, matching eager PyTorch, RGB and grey."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import onnx
import pytest
import torch

from hrm_vision import cli
from hrm_vision.compact import CompactStudentVAE
from hrm_vision.export import command, ort_session, run_onnx
from hrm_vision.io import model_entry, save_checkpoint
from hrm_vision.vae import LatentAdapter
from tests.helpers.models import perturbed


def main(argv: list[str]) -> int:
    """The command as ``hrm-vision export`` runs it (expected failures: one line, status 2)."""
    return cli.run_main("hrm-vision export", command, argv)


def compact_checkpoint(path: Path, channels: int) -> CompactStudentVAE:
    """A tiny perturbed compact student (8 numbers, width 4) with a vector adapter to 16."""
    torch.manual_seed(0)
    model = perturbed(CompactStudentVAE(latent_dim=8, base_channels=4, input_channels=channels))
    adapter = LatentAdapter(8, 16, vector=True).eval()
    save_checkpoint({**model_entry(model, "student"), "adapter_state_dict": adapter.state_dict(),
                     "adapter_arch": adapter.arch_config()}, path)
    return model  # type: ignore[return-value]


@pytest.fixture(scope="module", params=[3, 1], ids=["rgb", "grey"])
def exported(request, tmp_path_factory) -> tuple[CompactStudentVAE, Path, dict, str]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(f"compact_export_{request.param}")
    model = compact_checkpoint(root / "s.pth", request.param)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["--checkpoint", str(root / "s.pth"), "--out-dir", str(root / "out"),
                       "--precision", "fp32", "--num-images", "8", "--timing-repeats", "1",
                       "--frame-repeats", "1"])
    assert status == 0
    return model, root / "out", json.loads((root / "out/export.json").read_text()), \
        printed.getvalue()


def test_encoder_and_decoder_match_eager_at_any_batch(exported) -> None:
    model, out, _, _ = exported
    c = model.in_channels
    enc, dec = ort_session(out / "tinyvae_encoder.onnx"), ort_session(out / "tinyvae_decoder.onnx")
    for batch in (1, 5):
        x = torch.rand(batch, c, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            z, rec = model.encode(x), model.decode(model.encode(x))
        got = run_onnx(enc, x)
        assert tuple(got.shape) == (batch, 8)
        assert (got - z).abs().max() <= 1e-4
        assert (run_onnx(dec, z) - rec).abs().max() <= 1e-4


def test_only_the_batch_is_dynamic_and_metadata_says_so(exported) -> None:
    model, out, report, _ = exported
    graph = onnx.load(str(out / "tinyvae_encoder.onnx"))
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", model.in_channels, 64, 64]
    out_dims = [d.dim_param or d.dim_value
                for d in graph.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", 8]
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["image_size"] == "64x64 (fixed)" and meta["latent_shape"] == "[batch, 8]"
    assert meta["graph"] == "compact_student encoder"
    assert meta["color_order"] == ("RGB" if model.in_channels == 3 else "grey (one channel)")
    assert list(report["parity_sizes"]) == ["64x64"]
    assert all(v <= 1e-4 for v in report["max_abs_diff"].values())
    assert "encoder_teacher_space_onnx" in report["files"]


def test_summary_gives_fixed_tensorrt_shapes(exported) -> None:
    model, _, _, printed = exported
    assert f"--minShapes=image:1x{model.in_channels}x64x64" in printed
    assert "--maxShapes=latent:64x8" in printed


def test_another_image_size_is_a_usage_error(tmp_path, capsys) -> None:
    compact_checkpoint(tmp_path / "s.pth", 3)
    assert main(["--checkpoint", str(tmp_path / "s.pth"), "--out-dir", str(tmp_path / "o"),
                 "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "64x64 crops only" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_grey_checkpoint_through_the_sage_factory(tmp_path) -> None:
    """A grey compact student's checkpoint: SAGE's factory and SAGE's model-level ``TinyVAE``
    (``SageVAE``) feed it grey crops as they are (no repetition to RGB) and give its own
    latents."""
    import warnings

    from hrm_vision.irp.sage import SageVAE, create_tinyvae_irp

    path = tmp_path / "grey.pth"
    model = compact_checkpoint(path, 1)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plugin = create_tinyvae_irp(device="cpu", input_channels=1, checkpoint=path)
        with pytest.raises(ValueError, match="1-channel crops"):
            create_tinyvae_irp(device="cpu", input_channels=3, checkpoint=path)
    sage_vae = SageVAE(input_channels=1, latent_dim=8, checkpoint=path).eval()
    with torch.no_grad():
        expected = model.encode(x)
        assert torch.allclose(plugin.get_latents(x), expected, atol=1e-6)
        assert tuple(plugin.decode_batch(plugin.get_latents(x)).shape) == (2, 1, 64, 64)
        recon, mu, _ = sage_vae(x)
    assert torch.allclose(mu, expected, atol=1e-6) and tuple(recon.shape) == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="input_channels=3 disagrees"):
        SageVAE(input_channels=3, latent_dim=8, checkpoint=path)
