"""Exported graphs at any frame size, and the fp16 and int8 variants: parity bound per precision."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from hrm_vision.export import PARITY_TOLERANCE, ExportError, export_model, ort_session, run_onnx
from hrm_vision.export.frames import PARITY_SIZES, parse_size, photo_frames
from hrm_vision.export.precision import parse_precisions, precision_path
from hrm_vision.vae import MinimalVAE

#: Sizes beyond the parity sizes: non-square, and the smallest grid (one latent cell).
ODD_SIZES = ((40, 24), (8, 8))


def small_student(photo_batch: torch.Tensor) -> MinimalVAE:
    """A small student initialised from data (its linear path is patch PCA, as a fresh student
    before training) with its zero-initialised branch ends nudged, so every layer contributes."""
    torch.manual_seed(0)
    model = MinimalVAE(latent_dim=48, base_channels=8)
    model.init_from_data(photo_batch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, photo_batch: torch.Tensor):
    out = tmp_path_factory.mktemp("precisions")
    model = small_student(photo_batch)
    frames = {"64x64": photo_frames(64, 64), "480x640": photo_frames(480, 640)}
    result = export_model(model, out, photo_batch[:8], precisions=("fp32", "fp16", "int8"),
                          calibration=photo_batch, parity_images=frames)
    return model, out, result


class TestAnyFrameSize:
    @pytest.mark.parametrize("size", PARITY_SIZES + ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
    def test_both_halves_match_eager(self, exported, size) -> None:
        model, out, _ = exported
        torch.manual_seed(1)
        x = torch.rand(2, 3, *size)
        enc = ort_session(out / "tinyvae_encoder.onnx")
        dec = ort_session(out / "tinyvae_decoder.onnx")
        with torch.no_grad():
            z = model.encode(x)
            assert run_onnx(enc, x).shape == z.shape == (2, 48, size[0] // 8, size[1] // 8)
            assert (run_onnx(enc, x) - z).abs().max() <= PARITY_TOLERANCE
            assert (run_onnx(dec, z) - model.decode(z)).abs().max() <= PARITY_TOLERANCE

    def test_height_and_width_are_symbolic(self, exported) -> None:
        _, out, _ = exported
        for name, scale in (("encoder", "8*"), ("decoder", "")):
            graph = onnx.load(str(out / f"tinyvae_{name}.onnx")).graph
            dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
            assert dims == ["batch", "", f"{scale}latent_height", f"{scale}latent_width"]

    def test_a_side_not_divisible_by_8_is_refused(self, exported) -> None:
        _, out, _ = exported
        with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
            run_onnx(ort_session(out / "tinyvae_encoder.onnx"), torch.rand(1, 3, 36, 32))

    def test_real_photographs_at_each_size(self, exported) -> None:
        _, _, result = exported
        assert list(result.parity_sizes) == ["32x32", "64x64", "480x640"]
        assert all(v <= PARITY_TOLERANCE for d in result.parity_sizes.values()
                   for v in d.values())


class TestPrecisions:
    def test_files_next_to_fp32_with_their_precision_in_the_metadata(self, exported) -> None:
        _, out, result = exported
        for precision, files in result.precision_files.items():
            for part, path in files.items():
                assert Path(path) == precision_path(out / f"tinyvae_{part}.onnx", precision)
                meta = {p.key: p.value for p in onnx.load(path).metadata_props}
                assert meta["color_order"] == "RGB"
                assert meta.get("precision", "fp32").startswith(precision)

    def test_fp32_costs_nothing(self, exported) -> None:
        _, _, result = exported
        for cost in result.precision_costs["fp32"].values():
            assert abs(cost["psnr_cost_db"]) < 1e-3
            assert cost["roundtrip_max_abs_err"] <= PARITY_TOLERANCE

    def test_fp16_within_1e_2_and_a_tenth_of_a_db(self, exported) -> None:
        _, _, result = exported
        for size, cost in result.precision_costs["fp16"].items():
            assert cost["decoder_max_abs_err"] <= 1e-2, size
            assert cost["roundtrip_max_abs_err"] <= 1e-2, size
            assert abs(cost["psnr_cost_db"]) <= 0.1, size
            assert cost["encoder_max_abs_err"] > 0  # it is really fp16 arithmetic

    def test_int8_within_half_a_db(self, exported) -> None:
        _, _, result = exported
        for size, cost in result.precision_costs["int8"].items():
            assert cost["psnr_cost_db"] <= 0.5, size
            assert cost["roundtrip_max_abs_err"] > 1e-3  # it is really quantised

    def test_int8_is_qdq_with_per_channel_weights(self, exported) -> None:
        _, _, result = exported
        graph = onnx.load(result.precision_files["int8"]["encoder"]).graph
        ops = {n.op_type for n in graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
        inits = {i.name: i for i in graph.initializer}
        per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear"
                       and inits.get(n.input[1]) is not None and len(inits[n.input[1]].dims)
                       and inits[n.input[1]].dims[0] > 1]
        assert per_channel, "no weight is quantised per output channel"
        fp16 = onnx.load(result.precision_files["fp16"]["encoder"]).graph
        assert fp16.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 IO
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.initializer)

    def test_int8_needs_calibration_images(self, tmp_path, photo_batch) -> None:
        with pytest.raises(ExportError, match="calibration"):
            export_model(small_student(photo_batch), tmp_path, photo_batch[:2],
                         precisions=("fp32", "int8"))


class TestParsing:
    def test_precisions_fp32_first_and_unknown_refused(self) -> None:
        assert parse_precisions("int8,fp16") == ("fp32", "fp16", "int8")
        assert parse_precisions("fp32") == ("fp32",)
        with pytest.raises(ValueError, match="unknown precision bf16"):
            parse_precisions("fp16,bf16")

    def test_sizes(self) -> None:
        assert parse_size("480x640") == (480, 640)
        for bad in ("480x630", "0x8", "640"):
            with pytest.raises(ValueError):
                parse_size(bad)

    def test_photo_frames_are_real_and_sized(self) -> None:
        frames = photo_frames(480, 640)
        assert frames.shape == (3, 3, 480, 640)
        assert 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0.1
