"""Export of the TinyVAE (:mod:`hrm_vision.export`): ONNX and TorchScript files matching eager
PyTorch on real images at any frame size, their names and metadata, the teacher-space encoder,
the fp16 and int8 variants, the inference runners, the command, and an export replacing the
previous set whole (a failure, a SIGTERM or a full disk midway leaves that set as it was, names
the file that could not be written and leaves no staging folder; the user's files are kept)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import onnx
import pytest
import torch
from torch import nn

from hrm_vision import cli
from hrm_vision import export as export_module
from hrm_vision.export import (
    FP32_WEIGHTS,
    MAX_COST_DB,
    PARITY_SIZES,
    PARITY_TOLERANCE,
    ExportError,
    VAEGraph,
    calibration_frames,
    chain,
    check_parity,
    command,
    cost_check,
    eager_runner,
    export_model,
    export_set,
    generated_frames,
    load_torchscript,
    onnx_runner,
    ort_session,
    parse_precisions,
    parse_size,
    photo_frames,
    precision_path,
    remove_stale_stages,
    run_onnx,
    to_int8,
)
from hrm_vision.io import FolderLock, load, model_entry, save_checkpoint
from hrm_vision.vae import LatentAdapter, MinimalVAE
from tests.helpers.models import perturbed_student

ROOT = Path(__file__).resolve().parents[1]
TEACHER_SPACE = "tinyvae_encoder_teacher_space.onnx"
NO_CUDA = "no CUDA device on this machine: the CUDA runs are checked on a machine with a GPU"
#: Sizes beyond the parity sizes: non-square, and the smallest grid (one latent cell).
ODD_SIZES = ((40, 24), (8, 8))


def main(argv: list[str]) -> int:
    """The command as ``hrm-vision export`` runs it (expected failures: one line, status 2)."""
    return cli.run_main("hrm-vision export", command, argv)


def tiny_adapter() -> LatentAdapter:
    """A tiny adapter (8 student channels -> 16) with a random bias, for the tiny student."""
    torch.manual_seed(1)
    adapter = LatentAdapter(8, 16)
    with torch.no_grad():
        adapter.proj.bias.uniform_(-1, 1)
    return adapter.eval()


def with_adapter(payload: dict) -> dict:
    """``payload`` with :func:`tiny_adapter` stored as the distiller stores it."""
    adapter = tiny_adapter()
    return {**payload, "adapter_state_dict": adapter.state_dict(),
            "adapter_arch": adapter.arch_config()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[MinimalVAE, Path, dict]:
    """The tiny student, its export folder (written by the CLI) and ``export.json``; the
    checkpoint also holds :func:`tiny_adapter`, so the teacher-space encoder is exported too."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("export")
    model = perturbed_student()
    save_checkpoint(with_adapter(model_entry(model, "student")), root / "tinyvae_best.pth")
    assert main(["--checkpoint", str(root / "tinyvae_best.pth"), "--out-dir", str(root / "out"),
                 "--num-images", "8", "--timing-repeats", "2", "--precision", "fp32,fp16,int8",
                 "--calibration-size", "64x80", "--cost-size", "64x96",
                 "--parity-sizes", "64x64,224x224,480x640", "--frame-repeats", "1"]) == 0
    return model, root / "out", json.loads((root / "out" / "export.json").read_text())


class TestOnnx:
    def test_matches_eager_on_real_images_any_batch(self, exported, photo_batch) -> None:
        model, out, _ = exported
        enc = ort_session(out / "tinyvae_encoder.onnx")
        dec = ort_session(out / "tinyvae_decoder.onnx")
        for batch in (photo_batch[:1], photo_batch[:3], photo_batch):  # dynamic batch
            with torch.no_grad():
                z = model.encode(batch)
                x_hat = model.decode(z)
            assert run_onnx(enc, batch).shape == z.shape
            assert (run_onnx(enc, batch) - z).abs().max() <= PARITY_TOLERANCE
            assert (run_onnx(dec, z) - x_hat).abs().max() <= PARITY_TOLERANCE

    def test_names_dynamic_batch_and_no_batchnorm_node(self, exported) -> None:
        _, out, _ = exported
        for part, inp, outp in (("encoder", "image", "latent"), ("decoder", "latent", "image")):
            graph = onnx.load(str(out / f"tinyvae_{part}.onnx")).graph
            assert [i.name for i in graph.input] == [inp]
            assert [o.name for o in graph.output] == [outp]
            assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
            assert "BatchNormalization" not in {n.op_type for n in graph.node}

    def test_metadata_states_the_conventions(self, exported) -> None:
        _, out, _ = exported
        for part in ("encoder", "decoder"):
            meta = {p.key: p.value for p in onnx.load(str(out / f"tinyvae_{part}.onnx"))
                    .metadata_props}
            assert meta["image_range"].startswith("[0, 1]")
            assert meta["color_order"] == "RGB"
            assert meta["layout"] == "NCHW"
            assert meta["latent_shape"] == "[batch, 8, height/8, width/8]"
            assert json.loads(meta["arch"]) == {"latent_dim": 8, "base_channels": 8}


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
class TestTorchScript:
    def test_matches_eager_and_carries_metadata(self, exported, photo_batch) -> None:
        model, out, _ = exported
        enc = load_torchscript(out / "tinyvae_encoder.torchscript.pt")
        dec = load_torchscript(out / "tinyvae_decoder.torchscript.pt")
        with torch.no_grad():
            z = model.encode(photo_batch[:5])
            assert (enc(photo_batch[:5]) - z).abs().max() <= PARITY_TOLERANCE
            assert (dec(z) - model.decode(z)).abs().max() <= PARITY_TOLERANCE
        extra = {"metadata.json": ""}
        torch.jit.load(str(out / "tinyvae_encoder.torchscript.pt"), _extra_files=extra)
        assert json.loads(extra["metadata.json"])["color_order"] == "RGB"


class TestParityCheck:
    def test_report_lists_every_file_within_tolerance(self, exported) -> None:
        _, out, report = exported
        assert set(report["max_abs_diff"]) == {"encoder_onnx", "encoder_torchscript",
                                               "decoder_onnx", "decoder_torchscript",
                                               "encoder_teacher_space_onnx"}
        assert all(0 <= v <= PARITY_TOLERANCE for v in report["max_abs_diff"].values())
        assert all(Path(p).is_file() for p in report["files"].values())

    def test_runtime_comparison_reported(self, exported) -> None:
        _, _, report = exported
        assert report["throughput_batch"] == 8
        assert set(report["throughput_ips"]) == {"pytorch_eager", "onnxruntime", "torchscript"}
        assert all(0 < v < float("inf") for v in report["throughput_ips"].values())

    def test_every_size_and_precision_recorded(self, exported) -> None:
        _, out, report = exported
        assert list(report["parity_sizes"]) == ["32x32", "64x64", "224x224", "480x640"]
        for diffs in report["parity_sizes"].values():
            assert set(diffs) == set(report["files"])
            assert all(0 <= v <= PARITY_TOLERANCE for v in diffs.values())
        assert list(report["precision_costs"]) == ["fp32", "fp16", "int8"]
        assert set(report["frame_latency"]) == {"pytorch_eager", "onnxruntime_fp32",
                                                "onnxruntime_fp16", "onnxruntime_int8"}
        assert report["frame_size"] == "480x640"
        assert all(v["median_ms"] > 0 for v in report["frame_latency"].values())
        for files in report["precision_files"].values():
            assert all(Path(p).is_file() and Path(p).parent == out for p in files.values())

    def test_mismatch_is_an_error(self, exported, photo_batch) -> None:
        _, _, report = exported
        other = perturbed_student()
        with torch.no_grad():
            for p in other.encoder.parameters():
                p.add_(0.1)
        with pytest.raises(ExportError, match="differ from eager"):
            check_parity(other, report["files"], photo_batch[:4], adapter=tiny_adapter())


class TestCommand:
    def test_prints_camera_profiles_and_each_precision(self, tmp_path, capsys) -> None:
        save_checkpoint(model_entry(perturbed_student(), "student"), tmp_path / "s.pth")
        assert main(["--checkpoint", str(tmp_path / "s.pth"), "--out-dir", str(tmp_path / "o"),
                     "--num-images", "4", "--timing-repeats", "0", "--frame-repeats", "0",
                     "--precision", "fp16", "--parity-sizes", "480x640",
                     "--cost-size", "64x96"]) == 0
        out = capsys.readouterr().out
        assert "--optShapes=image:1x3x480x640" in out and "--optShapes=latent:1x8x60x80" in out
        assert "fp16  480x640: max |err|" in out and "int8" not in out.split("TensorRT")[0]
        assert sorted(p.name for p in (tmp_path / "o").glob("*.onnx")) == [
            "tinyvae_decoder.fp16.onnx", "tinyvae_decoder.onnx", "tinyvae_encoder.fp16.onnx",
            "tinyvae_encoder.onnx"]

    def test_a_graph_over_its_cost_is_refused_by_name(self, tmp_path, capsys,
                                                        photo_batch) -> None:
        """Under a threshold of 0.001 dB the int8 graphs (a few hundredths of a dB here) are
        refused: one line naming the graph and its cost, nothing written; ``--max-cost-db inf``
        waives the check and records the cost."""
        save_checkpoint(model_entry(small_student(photo_batch), "student"), tmp_path / "s.pth")
        argv = ["--checkpoint", str(tmp_path / "s.pth"), "--out-dir", str(tmp_path / "o"),
                "--num-images", "4", "--timing-repeats", "0", "--frame-repeats", "0",
                "--parity-sizes", "", "--cost-size", "48x64", "--calibration-size", "48x64"]
        assert main([*argv, "--max-cost-db", "0.001"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
        cost = re.search(r"tinyvae_(en|de)coder\.int8\.onnx costs ([0-9.]+) dB", err)
        assert cost and float(cost.group(2)) > 0.001 and "--max-cost-db 0.001" in err
        assert main([*argv, "--max-cost-db", "inf"]) == 0
        check = json.loads((tmp_path / "o" / "export.json").read_text())["cost_check"]
        assert check["int8"]["passed"] and max(check["int8"]["max_cost_db"].values()) > 0.001
        assert abs(check["fp32"]["max_cost_db"]["roundtrip"]) < 1e-3
        assert set(check["int8"]["costs_db"]) == {"generated 48x64", "photos val 48x64"}

    @pytest.mark.parametrize("flag, value, message", [
        ("--max-cost-db", "-1", "--max-cost-db must be >= 0"),
        ("--cost-frames", "/nonexistent", "is not a folder"),
        ("--precision", "fp8", "unknown precision fp8"),
        ("--parity-sizes", "480x636", "multiples of 8"),
        ("--frame-size", "480", "HEIGHTxWIDTH")])
    def test_bad_precision_or_size_is_a_usage_error(self, flag, value, message, capsys) -> None:
        with pytest.raises(SystemExit) as info:
            main([flag, value])
        assert info.value.code == 2
        assert message in capsys.readouterr().err

    def test_missing_checkpoint_is_exit_2_with_the_reason(self, tmp_path, capsys) -> None:
        assert main(["--checkpoint", str(tmp_path / "nope.pth"), "--out-dir",
                     str(tmp_path / "out"), "--timing-repeats", "0"]) == 2
        err = capsys.readouterr().err
        assert "checkpoint not found" in err and "Traceback" not in err

    def test_bad_option_is_a_usage_error(self, tmp_path, capsys) -> None:
        with pytest.raises(SystemExit) as info:
            main(["--threads", "0"])
        assert info.value.code == 2
        assert "--num-images and --threads >= 1" in capsys.readouterr().err


class TestSafetensors:
    def test_weights_file_loads_back_to_the_same_model(self, exported, photo_batch) -> None:
        model, out, report = exported
        path = Path(report["weights_file"])
        assert path == out / "tinyvae.safetensors"
        loaded = load(path).eval()
        with torch.no_grad():
            assert torch.equal(loaded.encode(photo_batch), model.eval().encode(photo_batch))


class TestTeacherSpace:
    """``tinyvae_encoder_teacher_space.onnx``: image -> adapter(student.encode(image))."""

    def test_matches_eager_adapter_of_encoder_any_batch(self, exported,
                                                        photo_batch) -> None:
        (model, out, _), adapter = exported, tiny_adapter()
        session = ort_session(out / TEACHER_SPACE)
        for batch in (photo_batch[:1], photo_batch[:3], photo_batch):  # dynamic batch
            with torch.no_grad():
                expected = adapter(model.encode(batch))
            got = run_onnx(session, batch)
            assert got.shape == (batch.shape[0], 16, 4, 4) == expected.shape
            assert (got - expected).abs().max() <= PARITY_TOLERANCE
        with torch.no_grad():  # the adapter is in the graph: without it the output is far off
            assert (got - expected + adapter.proj.bias[None, :, None, None]).abs().max() > 0.1

    def test_names_dynamic_batch_and_metadata(self, exported) -> None:
        _, out, _ = exported
        model = onnx.load(str(out / TEACHER_SPACE))
        assert [i.name for i in model.graph.input] == ["image"]
        assert [o.name for o in model.graph.output] == ["teacher_latent"]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["latent_shape"] == "[batch, 16, height/8, width/8]"
        assert meta["image_range"].startswith("[0, 1]")
        assert json.loads(meta["adapter_arch"]) == {"student_dim": 8, "teacher_dim": 16}
        assert "teacher" in meta["latent"]

    def test_parity_and_metadata_recorded_like_the_others(self, exported) -> None:
        _, out, report = exported
        assert report["files"]["encoder_teacher_space_onnx"] == str(out / TEACHER_SPACE)
        assert report["max_abs_diff"]["encoder_teacher_space_onnx"] <= PARITY_TOLERANCE
        assert "encoder_teacher_space" in report["metadata"]

    def test_a_wrong_or_missing_adapter_fails_the_parity_check(self, exported,
                                                               photo_batch) -> None:
        (model, out, _), adapter = exported, tiny_adapter()
        files = {"encoder_teacher_space_onnx": str(out / TEACHER_SPACE)}
        other = tiny_adapter()
        with torch.no_grad():
            other.proj.weight.add_(0.1)
        with pytest.raises(ExportError, match="differ from eager"):
            check_parity(model, files, photo_batch[:4], adapter=other)
        with pytest.raises(ExportError, match="needs the adapter"):
            check_parity(model, files, photo_batch[:4])
        assert check_parity(model, files, photo_batch[:4], adapter=adapter)[
            "encoder_teacher_space_onnx"] <= PARITY_TOLERANCE

    @pytest.mark.parametrize("adapter, flag, expected", [
        (True, [], True), (False, [], False), (True, ["--no-teacher-space"], False)],
        ids=["with adapter", "no adapter", "turned off"])
    def test_written_only_with_an_adapter_and_not_turned_off(self, tmp_path, monkeypatch,
                                                             adapter, flag, expected) -> None:
        """The command's choice, through the real ``export_model`` with the writers recorded
        (no export runs, so this is fast)."""
        payload = model_entry(perturbed_student(), "student")
        path = save_checkpoint(with_adapter(payload) if adapter else payload,
                               tmp_path / "tinyvae_best.pth")
        written, checked = [], {}
        pipeline = "hrm_vision.export"

        def record(graph, spec, file, *rest):
            written.append(Path(file).name)
            return file

        def parity(vae, files, images, adapter=None):
            checked["adapter"] = adapter
            return dict.fromkeys(files, 0.0)

        monkeypatch.setattr(f"{pipeline}.export_onnx", record)
        monkeypatch.setattr(f"{pipeline}.export_torchscript", record)
        monkeypatch.setattr(f"{pipeline}.check_parity", parity)
        def weights(vae, file, adapter=None):
            checked["weights_adapter"] = adapter
            return file

        monkeypatch.setattr(f"{pipeline}.save", weights)
        monkeypatch.setattr(f"{pipeline}.precision_costs", lambda *a: {})
        monkeypatch.setattr(f"{pipeline}.cost_check", lambda *a: {})
        monkeypatch.setattr(f"{pipeline}.validation_images",
                            lambda *a, **k: torch.rand(2, 3, 32, 32))
        assert main(["--checkpoint", str(path), "--out-dir", str(tmp_path / "out"),
                     "--timing-repeats", "0", "--precision", "fp32", "--parity-sizes", "",
                     "--frame-repeats", "0", *flag]) == 0
        assert (TEACHER_SPACE in written) is expected
        assert {"tinyvae_encoder.onnx", "tinyvae_decoder.onnx"} <= set(written)
        assert isinstance(checked["adapter"], LatentAdapter) is expected
        assert isinstance(checked["weights_adapter"], LatentAdapter) is expected
        report = json.loads((tmp_path / "out" / "export.json").read_text())
        assert ("encoder_teacher_space_onnx" in report["files"]) is expected

    def test_adapter_role_is_a_usage_error(self, capsys) -> None:
        with pytest.raises(SystemExit) as info:
            main(["--role", "adapter"])
        assert info.value.code == 2
        assert "--role must name a VAE" in capsys.readouterr().err

    def test_an_adapter_of_another_student_is_refused(self, tmp_path, photo_batch) -> None:
        with pytest.raises(ExportError, match="adapter reads 4 latent channels, the model "
                                              "writes 8"):
            export_model(perturbed_student(), tmp_path, photo_batch[:2],
                         adapter=LatentAdapter(4, 16))

    def test_one_graph_class_serves_every_part(self, photo_batch) -> None:
        model, adapter = perturbed_student(), tiny_adapter()
        with torch.no_grad():
            z = model.encode(photo_batch[:2])
            assert torch.equal(VAEGraph(model, "encoder")(photo_batch[:2]), z)
            assert torch.equal(VAEGraph(model, "decoder")(z), model.decode(z))
            assert torch.equal(VAEGraph(model, "encoder_teacher_space", adapter)(
                photo_batch[:2]), adapter(z))
        assert isinstance(VAEGraph(model, "encoder").vae.decoder, nn.Identity)  # half only
        with pytest.raises(ValueError, match="adapter goes with"):
            VAEGraph(model, "encoder", adapter)


# --------------------------------------------------------------- frame sizes and precisions
def small_student(photo_batch: torch.Tensor) -> MinimalVAE:
    """A small student initialised from data (its linear path is patch PCA, as a fresh student
    before training) with its nonlinear stages nudged (their zero-initialised ends too), so every
    layer contributes and a smooth frame reconstructs at about 36 dB."""
    torch.manual_seed(0)
    model = MinimalVAE(latent_dim=48, base_channels=8)
    model.init_from_data(photo_batch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(tag in f".{name}" for tag in FP32_WEIGHTS):
                p.add_(0.01 * torch.randn_like(p))
    return model.eval()


SKY = "sky 240x320"


@pytest.fixture(scope="module")
def precisions_export(tmp_path_factory: pytest.TempPathFactory, photo_batch: torch.Tensor):
    out = tmp_path_factory.mktemp("precisions")
    model = small_student(photo_batch)
    frames = {"64x64": photo_frames(64, 64), "480x640": photo_frames(480, 640)}
    generated = generated_frames(240, 320)
    result = export_model(model, out, photo_batch[:8], precisions=("fp32", "fp16", "int8"),
                          calibration=calibration_frames(64, 80), parity_images=frames,
                          cost_frames={SKY: generated[:1], "generated 240x320": generated})
    return model, out, result


class TestAnyFrameSize:
    @pytest.mark.parametrize("size", PARITY_SIZES + ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
    def test_both_halves_match_eager(self, precisions_export, size) -> None:
        model, out, _ = precisions_export
        torch.manual_seed(1)
        x = torch.rand(2, 3, *size)
        enc = ort_session(out / "tinyvae_encoder.onnx")
        dec = ort_session(out / "tinyvae_decoder.onnx")
        with torch.no_grad():
            z = model.encode(x)
            assert run_onnx(enc, x).shape == z.shape == (2, 48, size[0] // 8, size[1] // 8)
            assert (run_onnx(enc, x) - z).abs().max() <= PARITY_TOLERANCE
            assert (run_onnx(dec, z) - model.decode(z)).abs().max() <= PARITY_TOLERANCE

    def test_height_and_width_are_symbolic(self, precisions_export) -> None:
        _, out, _ = precisions_export
        for name, scale in (("encoder", "8*"), ("decoder", "")):
            graph = onnx.load(str(out / f"tinyvae_{name}.onnx")).graph
            dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
            assert dims == ["batch", "", f"{scale}latent_height", f"{scale}latent_width"]

    def test_a_side_not_divisible_by_8_is_refused(self, precisions_export) -> None:
        _, out, _ = precisions_export
        with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
            run_onnx(ort_session(out / "tinyvae_encoder.onnx"), torch.rand(1, 3, 36, 32))

    def test_real_photographs_at_each_size(self, precisions_export) -> None:
        _, _, result = precisions_export
        assert list(result.parity_sizes) == ["32x32", "64x64", "480x640"]
        assert all(v <= PARITY_TOLERANCE for d in result.parity_sizes.values()
                   for v in d.values())


class TestPrecisions:
    def test_files_next_to_fp32_with_their_precision_in_the_metadata(self,
                                                                     precisions_export) -> None:
        _, out, result = precisions_export
        for precision, files in result.precision_files.items():
            for part, path in files.items():
                assert Path(path) == precision_path(out / f"tinyvae_{part}.onnx", precision)
                meta = {p.key: p.value for p in onnx.load(path).metadata_props}
                assert meta["color_order"] == "RGB"
                assert meta.get("precision", "fp32").startswith(precision)

    def test_fp32_costs_nothing(self, precisions_export) -> None:
        _, _, result = precisions_export
        for cost in result.precision_costs["fp32"].values():
            assert abs(cost["psnr_cost_db"]) < 1e-3
            assert cost["roundtrip_max_abs_err"] <= PARITY_TOLERANCE

    def test_fp16_within_1e_2_and_a_tenth_of_a_db(self, precisions_export) -> None:
        _, _, result = precisions_export
        for size, cost in result.precision_costs["fp16"].items():
            assert cost["decoder_max_abs_err"] <= 1e-2, size
            assert cost["roundtrip_max_abs_err"] <= 1e-2, size
            assert abs(cost["psnr_cost_db"]) <= 0.1, size
            assert cost["encoder_max_abs_err"] > 0  # it is really fp16 arithmetic

    def test_int8_within_half_a_db(self, precisions_export) -> None:
        _, _, result = precisions_export
        for size, cost in result.precision_costs["int8"].items():
            assert cost["psnr_cost_db"] <= 0.5, size
            assert cost["roundtrip_max_abs_err"] > 1e-3  # it is really quantised

    def test_int8_is_qdq_with_per_channel_weights(self, precisions_export) -> None:
        _, _, result = precisions_export
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

    def test_int8_reads_the_latent_in_float32(self, precisions_export) -> None:
        """The int8 decoder's convolutions that read the latent stay float32 (no quantised input):
        a trained latent spans about +-30, one uint8 scale for it cost 8 dB on camera frames."""
        _, _, result = precisions_export
        graph = onnx.load(result.precision_files["int8"]["decoder"]).graph
        readers = [n for n in graph.node if "latent" in n.input]
        assert readers and not any(n.op_type == "QuantizeLinear" for n in readers)
        assert any(n.op_type == "Conv" for n in readers)
        assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # later stages are int8

    def test_a_frame_of_sky_survives_int8(self, precisions_export, tmp_path, monkeypatch) -> None:
        """On a smooth gradient with sensor noise the int8 round trip stays within a tenth of
        the 0.5 dB threshold; quantising the convolution that reads the latent too (one uint8
        scale for the whole latent) costs several times more on it."""
        model, out, result = precisions_export
        check = result.cost_check["int8"]
        assert check["passed"] and check["threshold_db"] == MAX_COST_DB
        sky = check["costs_db"][SKY]
        assert sky["eager_psnr_db"] > 30 and abs(sky["psnr_cost_db"]) <= MAX_COST_DB / 10
        assert result.calibration.startswith("60 frames 64x80")
        monkeypatch.setattr(export_module, "_int8_float_convs", export_module._linear_path_convs)
        fp32 = Path(shutil.copy(out / "tinyvae_decoder.onnx", tmp_path / "d.onnx"))
        with torch.no_grad():
            latents = model.encode(calibration_frames(64, 80))
        naive = {"fp32": result.precision_files["fp32"],
                 "int8": {"encoder": result.precision_files["int8"]["encoder"],
                          "decoder": str(to_int8(fp32, latents))}}
        naive_sky = cost_check(model, naive, {SKY: generated_frames(240, 320)[:1]},
                               float("inf"))["int8"]["costs_db"][SKY]
        assert naive_sky["decoder_cost_db"] > 5 * max(sky["decoder_cost_db"], 0.01)

    def test_int8_residual_additions_quantised_the_linear_path_joins_float(
            self, precisions_export) -> None:
        """The nonlinear stages' residual additions are int8 (dequantised inputs, quantised
        output: one QLinearAdd after ONNX Runtime's fusion; with the ReLUs, 1.92x fp32 instead of
        1.69x on one thread); the one addition per graph that joins the linear patch path (into
        the latent, the image) keeps float32 inputs: on one uint8 scale it cost 13 dB."""
        _, _, result = precisions_export
        for part in ("encoder", "decoder"):
            graph = onnx.load(result.precision_files["int8"][part]).graph
            made_by = {o: n.op_type for n in graph.node for o in n.output}
            users = {i: n.op_type for n in graph.node for i in n.input}
            adds = [n for n in graph.node if n.op_type == "Add"]
            quantised = [n for n in adds if {made_by[i] for i in n.input} == {"DequantizeLinear"}
                         and users.get(n.output[0]) == "QuantizeLinear"]
            joins = [n for n in adds if n not in quantised]
            assert quantised and len(joins) == 1, part
            assert any(made_by.get(i) != "DequantizeLinear" for i in joins[0].input), part

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


# -------------------------------------------------------------------------------- runners
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


def test_onnx_runner_any_size(exported) -> None:
    model, out, _ = exported
    x = torch.rand(1, 3, 72, 40)
    with torch.no_grad():
        z = model.encode(x)
    assert (onnx_runner(out / "tinyvae_encoder.onnx", threads=1)(x) - z).abs().max() <= 1e-4


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


# ---------------------------------------------------------------- one set replaces the last
def student(seed: int) -> MinimalVAE:
    torch.manual_seed(seed)
    return MinimalVAE(latent_dim=4, base_channels=8).eval()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    """Hidden entries beside ``folder`` (staging folders) and inside it (temporaries)."""
    return sorted(p.name for p in [*folder.parent.iterdir(), *folder.iterdir()]
                  if p.name.startswith("."))


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """An export of one student into ``new/out`` (neither there before) under umask 022, then a
    user's file put beside it: the folder and its bytes."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("atomic") / "new" / "out"
    old = os.umask(0o022)
    try:
        export_model(student(0), out, torch.rand(2, 3, 16, 16))
        (out / "notes.txt").write_text("the user's\n")
    finally:
        os.umask(old)
    return out, snapshot(out)


def test_a_failure_midway_leaves_the_previous_set(first, monkeypatch) -> None:
    out, before = first
    assert {"tinyvae_encoder.onnx", "tinyvae_decoder.torchscript.pt", "tinyvae.safetensors",
            "notes.txt"} <= set(before)

    def fail(*args, **kwargs):
        raise RuntimeError("the weights writer broke")

    monkeypatch.setattr(export_module, "save", fail)  # after every graph
    with pytest.raises(RuntimeError, match="weights writer broke"):
        export_model(student(1), out, torch.rand(2, 3, 16, 16))
    assert snapshot(out) == before
    assert leftovers(out) == []


SIGTERM_MIDWAY = """
import os, signal, sys, torch
from hrm_vision import export as pipeline
from hrm_vision.vae import MinimalVAE
real = pipeline.export_torchscript
def stop(*args, **kwargs):
    path = real(*args, **kwargs)  # the encoder's TorchScript is written, then SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)
    return path
pipeline.export_torchscript = stop
torch.manual_seed(1)
pipeline.export_model(MinimalVAE(latent_dim=4, base_channels=8).eval(), sys.argv[1],
                      torch.rand(2, 3, 16, 16))
"""

FULL_DISK = """
import sys, torch
from hrm_vision import export as pipeline
from hrm_vision.vae import MinimalVAE
torch.manual_seed(1)
model = MinimalVAE(latent_dim=4, base_channels=8).eval()
for name, call in [
    ("torchscript", lambda: pipeline.export_torchscript(
        pipeline.VAEGraph(model, "decoder"), pipeline.graph_specs(model, 16)[1],
        __import__("pathlib").Path(sys.argv[2]) / "decoder.torchscript.pt", {})),
    ("export", lambda: pipeline.export_model(model, sys.argv[1], torch.rand(2, 3, 16, 16))),
]:
    try:
        call()
        print(name, "written")
    except OSError as exc:
        print(name, "OSError", exc)
"""


def _run(script: str, *args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails: EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, preexec_fn=limit, timeout=600)


class Stopped(NamedTuple):
    """A script's run on its own copy of the ``first`` set: that folder, the finished process,
    and an empty scratch folder it may write to."""

    out: Path
    proc: subprocess.CompletedProcess
    scratch: Path


@pytest.fixture(scope="module")
def stopped(first, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Stopped]:
    """:data:`SIGTERM_MIDWAY` and :data:`FULL_DISK` (under a 4096-byte file size limit: a write
    past it fails with ``EFBIG`` where a full disk gives ``ENOSPC``), each in a fresh
    interpreter on its own copy of ``first``'s folder, both at once (one per core of a 2-core
    machine: each spends seconds importing torch and tracing its first graph)."""
    work = tmp_path_factory.mktemp("stopped")
    runs = {}
    for name in ("sigterm", "disk"):
        runs[name] = (work / name / "out", work / f"{name}_scratch")
        shutil.copytree(first[0], runs[name][0])
        runs[name][1].mkdir()
    scripts = {"sigterm": (SIGTERM_MIDWAY, None), "disk": (FULL_DISK, 4096)}
    with ThreadPoolExecutor(len(runs)) as pool:
        procs = pool.map(lambda name: _run(scripts[name][0], *map(str, runs[name]),
                                           fsize=scripts[name][1]), runs)
        return {name: Stopped(out, proc, scratch)
                for (name, (out, scratch)), proc in zip(runs.items(), procs, strict=True)}


def test_sigterm_midway_exits_143_and_leaves_the_previous_set(first, stopped) -> None:
    out, proc, _ = stopped["sigterm"]
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert snapshot(out) == first[1]
    assert leftovers(out) == []


def test_a_full_disk_names_the_file_and_leaves_the_previous_set(first, stopped) -> None:
    out, proc, scratch = stopped["disk"]
    assert proc.returncode == 0, proc.stderr[-2000:]  # no SIGABRT from the TorchScript writer
    lines = proc.stdout.splitlines()
    assert any(f"cannot write {scratch / 'decoder.torchscript.pt'}: File too large" in line
               for line in lines if line.startswith("torchscript OSError")), proc.stdout
    assert any(f"cannot write {out / 'tinyvae_encoder.onnx'}: File too large" in line
               for line in lines if line.startswith("export OSError")), proc.stdout
    assert list(scratch.iterdir()) == []  # no truncated file, no temporary
    assert snapshot(out) == first[1]
    assert leftovers(out) == []


def test_a_new_set_replaces_the_old_whole_and_keeps_the_users_files(first, tmp_path) -> None:
    """Into a copy of the ``first`` set with one more file of an export's names (as an fp16
    variant would have left)."""
    out = tmp_path / "out"
    shutil.copytree(first[0], out)
    shutil.copy(out / "tinyvae_encoder.onnx", out / "tinyvae_encoder.fp16.onnx")
    export_model(student(1), out, torch.rand(2, 3, 16, 16))
    after = snapshot(out)
    assert "tinyvae_encoder.fp16.onnx" not in after  # no stale file of the earlier set
    assert after["notes.txt"] == b"the user's\n"
    _, first_bytes = first
    for name in ("tinyvae_encoder.onnx", "tinyvae_decoder.onnx", "tinyvae.safetensors"):
        assert after[name] != first_bytes[name], name  # another model's files, all of them
    assert leftovers(out) == []


def test_a_killed_exports_staging_folder_is_removed_a_live_one_kept(tmp_path) -> None:
    target = tmp_path / "out"
    dead = tmp_path / ".out.abcdefgh.export"
    dead.mkdir()
    (dead / "tinyvae_encoder.onnx").write_bytes(b"half")
    live = tmp_path / ".out.livelive.export"
    with FolderLock(live):
        assert remove_stale_stages(target) == [dead]
        assert live.is_dir()


def test_a_subfolder_in_the_target_is_refused_before_writing(tmp_path) -> None:
    (tmp_path / "out" / "sub").mkdir(parents=True)
    with pytest.raises(OSError, match="holds sub"), export_set(tmp_path / "out"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_files_and_folders_follow_the_umask(first, tmp_path) -> None:
    """Under umask 022 a new export folder is drwxr-xr-x and its files -rw-r--r-- (``first``);
    a folder that was there keeps its own permissions."""
    new = first[0]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in new.iterdir()}
    assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(new.parent.stat().st_mode) == 0o755
    assert set(modes.values()) == {0o644}, modes
    out = tmp_path / "out"
    shutil.copytree(new, out)
    out.chmod(0o750)
    old = os.umask(0o022)
    try:
        export_model(student(1), out, torch.rand(2, 3, 16, 16))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
