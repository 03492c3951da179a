"""ONNX and TorchScript export of the TinyVAE: parity with eager PyTorch, metadata, folding."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from hrm_vision.export import (
    PARITY_TOLERANCE,
    ExportError,
    VAEGraph,
    check_parity,
    export_model,
    fold_batchnorm,
    load_torchscript,
    ort_session,
    run_onnx,
)
from hrm_vision.export.__main__ import main
from hrm_vision.io import load, model_entry, save_checkpoint
from hrm_vision.vae import LatentAdapter, MinimalVAE
from tests.helpers.models import perturbed_student

TEACHER_SPACE = "tinyvae_encoder_teacher_space.onnx"




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


def conv_bn_net() -> nn.Sequential:
    """Two Conv2d + BatchNorm2d pairs with non-trivial statistics, so folding has work to do."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[MinimalVAE, Path, dict]:
    """The tiny student, its export folder (written by the CLI) and ``export.json``; the
    checkpoint also holds :func:`tiny_adapter`, so the teacher-space encoder is exported too."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("export")
    model = perturbed_student()
    save_checkpoint(with_adapter(model_entry(model, "student")), root / "tinyvae_best.pth")
    assert main(["--checkpoint", str(root / "tinyvae_best.pth"), "--out-dir", str(root / "out"),
                 "--num-images", "8", "--timing-repeats", "2", "--calibration-images", "32",
                 "--parity-sizes", "64x64,224x224,480x640", "--frame-repeats", "1"]) == 0
    return model, root / "out", json.loads((root / "out" / "export.json").read_text())


class TestFoldBatchnorm:
    def test_no_batchnorm_left_and_same_output(self, photo_batch: torch.Tensor) -> None:
        net = conv_bn_net()
        folded = fold_batchnorm(net)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2, "input modified"
        with torch.no_grad():
            expected = net(photo_batch)
            assert (folded(photo_batch) - expected).abs().max() < 1e-5
            assert (expected - net[0](photo_batch)[:, :4]).abs().max() > 0.1  # BN mattered

    def test_a_model_without_batchnorm_is_unchanged(self, photo_batch: torch.Tensor) -> None:
        model = perturbed_student()
        folded = fold_batchnorm(model)
        with torch.no_grad():
            z = model.encode(photo_batch)
            assert torch.equal(folded.encode(photo_batch), z)
            assert torch.equal(folded.decode(z), model.decode(z))

    def test_lone_batchnorm_is_refused(self) -> None:
        with pytest.raises(ExportError, match="cannot be folded"):
            fold_batchnorm(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))


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
                     "--precision", "fp16", "--parity-sizes", "480x640"]) == 0
        out = capsys.readouterr().out
        assert "--optShapes=image:1x3x480x640" in out and "--optShapes=latent:1x8x60x80" in out
        assert "fp16  480x640: max |err|" in out and "int8" not in out.split("TensorRT")[0]
        assert sorted(p.name for p in (tmp_path / "o").glob("*.onnx")) == [
            "tinyvae_decoder.fp16.onnx", "tinyvae_decoder.onnx", "tinyvae_encoder.fp16.onnx",
            "tinyvae_encoder.onnx"]

    @pytest.mark.parametrize("flag, value, message", [
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
        assert "--threads and --calibration-images >= 1" in capsys.readouterr().err


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
        pipeline = "hrm_vision.export.pipeline"

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
        monkeypatch.setattr("hrm_vision.export.__main__.validation_images",
                            lambda *a: torch.rand(2, 3, 32, 32))
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
