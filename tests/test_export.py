"""ONNX and TorchScript export of the TinyVAE: parity with eager PyTorch, metadata, folding."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from hrm_vision.checkpoints import model_entry, save_checkpoint
from hrm_vision.export import (
    PARITY_TOLERANCE,
    ExportError,
    check_parity,
    fold_batchnorm,
    load_torchscript,
    ort_session,
    run_onnx,
)
from hrm_vision.export.__main__ import main
from hrm_vision.vae import MinimalVAE


def tiny_student() -> MinimalVAE:
    """A tiny student whose every parameter is perturbed, so that zero-initialised layers take
    part in the exported graphs too."""
    torch.manual_seed(0)
    model = MinimalVAE(latent_dim=8, base_channels=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


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
    """The tiny student, its export folder (written by the CLI) and ``export.json``."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("export")
    model = tiny_student()
    save_checkpoint(model_entry(model, "student"), root / "tinyvae_best.pth")
    assert main(["--checkpoint", str(root / "tinyvae_best.pth"), "--out-dir", str(root / "out"),
                 "--num-images", "8", "--timing-repeats", "2"]) == 0
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
        model = tiny_student()
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
            assert meta["latent_shape"] == "[batch, 8, 4, 4]"
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
                                               "decoder_onnx", "decoder_torchscript"}
        assert all(0 <= v <= PARITY_TOLERANCE for v in report["max_abs_diff"].values())
        assert all(Path(p).is_file() for p in report["files"].values())

    def test_runtime_comparison_reported(self, exported) -> None:
        _, _, report = exported
        assert report["throughput_batch"] == 8
        assert set(report["throughput_ips"]) == {"pytorch_eager", "onnxruntime", "torchscript"}
        assert all(0 < v < float("inf") for v in report["throughput_ips"].values())

    def test_mismatch_is_an_error(self, exported, photo_batch) -> None:
        _, _, report = exported
        other = tiny_student()
        with torch.no_grad():
            for p in other.encoder.parameters():
                p.add_(0.1)
        with pytest.raises(ExportError, match="differ from eager"):
            check_parity(other, report["files"], photo_batch[:4])


class TestCommand:
    def test_missing_checkpoint_is_exit_2_with_the_reason(self, tmp_path, capsys) -> None:
        assert main(["--checkpoint", str(tmp_path / "nope.pth"), "--out-dir",
                     str(tmp_path / "out"), "--timing-repeats", "0"]) == 2
        err = capsys.readouterr().err
        assert "checkpoint not found" in err and "Traceback" not in err

    def test_bad_option_is_a_usage_error(self, tmp_path, capsys) -> None:
        with pytest.raises(SystemExit) as info:
            main(["--threads", "0"])
        assert info.value.code == 2
        assert "--threads >= 1" in capsys.readouterr().err


class TestSafetensors:
    def test_weights_file_loads_back_to_the_same_model(self, exported, photo_batch) -> None:
        model, out, report = exported
        path = Path(report["weights_file"])
        assert path == out / "tinyvae.safetensors"
        loaded = MinimalVAE.from_pretrained(path).eval()
        with torch.no_grad():
            assert torch.equal(loaded.encode(photo_batch), model.eval().encode(photo_batch))
