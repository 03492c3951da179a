"""``hrm-vision perceive``: a video, a folder of pictures -> latents and telemetry, on a small video
and pictures this test writes itself: the latents are the model's on the RGB frames, the channel
order follows the source, an export folder gives its fastest graph that passed its cost check, a
compact model encodes all crops of a frame at once, latents are stored smaller than the frame."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hrm_vision.cli import main as cli_main
from hrm_vision.compact import CompactStudentVAE
from hrm_vision.export import export_model
from hrm_vision.io import model_entry, save, save_checkpoint
from hrm_vision.perceive import Encoder, crops_of, pick_graph, read_latents, to_image
from hrm_vision.vae import MinimalVAE
from tests.helpers.models import perturbed, perturbed_student

cv2 = pytest.importorskip("cv2", reason="the video extra (opencv-python-headless) is missing")

FRAMES, HEIGHT, WIDTH = 6, 48, 80


def bgr_frames() -> list[np.ndarray]:
    """Frames with a red left half and a moving green square (BGR), so a channel swap shows."""
    out = []
    for i in range(FRAMES):
        f = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        f[:, : WIDTH // 2, 2] = 220
        f[8 + i: 24 + i, 40:56, 1] = 200
        out.append(f)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("perceive")
    video = root / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (WIDTH, HEIGHT))
    assert writer.isOpened()
    folder = root / "frames"
    folder.mkdir()
    for i, f in enumerate(bgr_frames()):
        writer.write(f)
        Image.fromarray(f[:, :, ::-1]).save(folder / f"{i:03d}.jpg", quality=90)  # RGB JPEGs
    writer.release()
    model = perturbed_student()
    ckpt = save_checkpoint(model_entry(model, "student"), root / "tinyvae_best.pth")
    export_model(model, root / "exports", torch.rand(2, 3, 32, 32))
    return {"root": root, "video": video, "folder": folder, "checkpoint": ckpt,
            "onnx": root / "exports" / "tinyvae_encoder.onnx"}


def main(argv: list[str]) -> int:
    """``hrm-vision perceive ARGV`` as the command line runs it."""
    return cli_main(["perceive", *argv])


def run(setup: dict[str, Path], source: str, *extra: str, name: str = "out") -> Path:
    out = setup["root"] / name
    assert main([source, "--threads", "1", "--out-dir", str(out), *extra]) == 0
    return out


def latents_of(out: Path) -> torch.Tensor:
    return read_latents(next(out.glob("latents.*")))


def test_video_with_the_onnx_encoder(setup, capsys) -> None:
    out = run(setup, str(setup["video"]), "--model", str(setup["onnx"]), name="video")
    from safetensors.torch import load_file

    tensors = load_file(str(out / "latents.safetensors"))
    assert tensors["latents"].shape == (FRAMES, 8, HEIGHT // 8, WIDTH // 8)
    assert tensors["latents"].dtype == torch.float16  # fp16 is smaller than the frame here
    assert torch.equal(tensors["frame_index"], torch.arange(FRAMES))
    records = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(FRAMES))
    assert all(r["encode_ms"] > 0 and r["total_ms"] >= r["encode_ms"] for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == FRAMES and summary["fps"] > 0
    assert summary["backend"] == "onnxruntime" and summary["frame_size"] == f"{HEIGHT}x{WIDTH}"
    assert summary["channel_order"] == "bgr"  # OpenCV decodes video as BGR
    assert summary["latency_p50_ms"] <= summary["latency_p90_ms"] <= summary["latency_p99_ms"]
    assert summary["conv_reference_gflops"] > 0 and summary["conv_share"] > 0
    printed = capsys.readouterr().out
    assert f"{FRAMES} frames of {HEIGHT}x{WIDTH}" in printed and "conv throughput" in printed


def decoded_rgb(setup) -> dict[str, torch.Tensor]:
    """The frames as the decoders give them, as RGB tensors: the JPEGs by PIL, the video by
    OpenCV (BGR, flipped here)."""
    jpegs = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(setup["folder"].iterdir())]
    capture, video = cv2.VideoCapture(str(setup["video"])), []
    while (read := capture.read())[0]:
        video.append(read[1][:, :, ::-1])
    capture.release()
    return {k: torch.from_numpy(np.stack(v).copy()).permute(0, 3, 1, 2).float() / 255
            for k, v in (("folder", jpegs), ("video", video))}


@pytest.mark.parametrize("source", ["folder", "video"])
def test_latents_equal_the_model_on_the_rgb_frames(setup, source) -> None:
    """A folder of JPEGs (read RGB) and a video (read BGR) each give the model's latents of the
    same decoded frames as RGB tensors; fp16 latents (the default) round them."""
    model = perturbed_student()
    with torch.no_grad():
        expected = model.encode(decoded_rgb(setup)[source])
    exact = latents_of(run(setup, str(setup[source]), "--model", str(setup["checkpoint"]),
                           "--latents", "fp32", "--format", "npz", name=f"{source}_fp32"))
    assert exact.shape == expected.shape and (exact - expected).abs().max() < 1e-5
    default = latents_of(run(setup, str(setup[source]), "--model", str(setup["onnx"]),
                             name=f"{source}_default"))
    assert (default - expected).abs().max() <= 2e-3 * expected.abs().max()


def test_channel_order_flag_overrides_the_source(setup) -> None:
    """``--channel-order bgr`` on RGB pictures swaps red and blue (other latents); a red pixel
    is channel 0 of the model's image."""
    rgb = latents_of(run(setup, str(setup["folder"]), "--model", str(setup["checkpoint"]),
                         name="order_default"))
    bgr = latents_of(run(setup, str(setup["folder"]), "--model", str(setup["checkpoint"]),
                         "--channel-order", "bgr", name="order_bgr"))
    assert (rgb - bgr).abs().max() > 1e-2
    first = to_image(bgr_frames()[0], "bgr")
    assert first[0, 0, 0, 0] > 0.8 and first[0, 2, 0, 0] == 0  # red is channel 0 (RGB)


def test_a_graph_taking_another_colour_order_is_an_error(setup, tmp_path, capsys) -> None:
    import onnx

    model = onnx.load(str(setup["onnx"]))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        "color_order": "BGR"})
    onnx.save(model, str(tmp_path / "bgr.onnx"))
    assert main([str(setup["video"]), "--model", str(tmp_path / "bgr.onnx"),
                 "--out-dir", str(tmp_path / "out")]) == 2
    assert "takes BGR images" in capsys.readouterr().err


def test_the_exported_safetensors_weights_give_the_checkpoint_latents(setup) -> None:
    """``--model exports/tinyvae.safetensors`` (what the export writes) runs through the same
    loader as the ``.pth`` checkpoint and gives the same latents."""
    got = {}
    for name, model in (("pth", setup["checkpoint"]),
                        ("safetensors", setup["root"] / "exports" / "tinyvae.safetensors")):
        out = run(setup, str(setup["folder"]), "--model", str(model), "--latents", "fp32",
                  "--format", "npz", name=f"weights_{name}")
        got[name] = np.load(out / "latents.npz")["latents"]
    assert got["pth"].shape == (FRAMES, 8, HEIGHT // 8, WIDTH // 8)
    assert np.array_equal(got["pth"], got["safetensors"])


def test_an_export_folder_gives_its_fastest_graph_that_passed(tmp_path, setup) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    files = {p: {"encoder": f"/elsewhere/tinyvae_encoder{'' if p == 'fp32' else '.' + p}.onnx"}
             for p in ("fp32", "fp16", "int8")}

    def report(int8_passed: bool, latency: dict[str, float]) -> None:
        (folder / "export.json").write_text(json.dumps({
            "precision_files": files, "cost_check": {p: {"passed": p != "int8" or int8_passed}
                                                     for p in files},
            "frame_latency": {f"onnxruntime_{p}": {"median_ms": ms}
                              for p, ms in latency.items()}}))

    report(True, {"fp32": 100, "fp16": 120, "int8": 60})
    assert pick_graph(folder) == (folder / "tinyvae_encoder.int8.onnx", "int8")
    report(False, {"fp32": 100, "fp16": 120, "int8": 60})  # refused: never picked
    assert pick_graph(folder) == (folder / "tinyvae_encoder.onnx", "fp32")
    with pytest.raises(ValueError, match="no int8 graph that passed"):
        pick_graph(folder, "int8")
    report(True, {"fp32": 100, "fp16": 90, "int8": 120})
    assert pick_graph(folder)[1] == "fp16"
    report(True, {})  # not timed: int8 first on a CPU
    assert pick_graph(folder)[1] == "int8"
    out = run(setup, str(setup["video"]), "--model", str(setup["root"] / "exports"),
              "--max-frames", "2", name="from_export")
    assert json.loads((out / "summary.json").read_text())["model"].endswith(
        "tinyvae_encoder.onnx")  # this export has fp32 only


def test_8bit_latents_of_a_vga_frame_are_smaller_than_the_frame(tmp_path) -> None:
    """The default student's latent of a 480x640 frame (128 x 60 x 80) is 1.2 MB in fp16, more
    than the 0.92 MB frame: the default stores it as 8-bit codes on a per-channel range, within
    half a step of the float latent."""
    torch.manual_seed(0)
    model = perturbed(MinimalVAE())
    save(model, tmp_path / "student.safetensors")
    (tmp_path / "frames").mkdir()
    frame = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    Image.fromarray(frame).save(tmp_path / "frames" / "0.png")
    out = tmp_path / "out"
    assert main([str(tmp_path / "frames"), "--model", str(tmp_path / "student.safetensors"),
                 "--threads", "1", "--out-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["latents"]["precision"] == "8bit"
    assert (out / "latents.safetensors").stat().st_size < frame.nbytes
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255)
    got = latents_of(out)
    step = (expected.amax(dim=(2, 3)) - expected.amin(dim=(2, 3))) / 255
    assert ((got - expected).abs() <= step[..., None, None] / 2 + 1e-5).all()


@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "grey"])
def test_a_compact_student_encodes_every_crop_of_a_frame_in_one_call(tmp_path, monkeypatch,
                                                                     channels) -> None:
    torch.manual_seed(0)
    model = perturbed(CompactStudentVAE(latent_dim=8, base_channels=4, input_channels=channels))
    save(model, tmp_path / "compact.safetensors")
    calls = []
    original = Encoder.__call__

    def counted(self, image):
        calls.append(len(self.model_input(image)))
        return original(self, image)

    monkeypatch.setattr(Encoder, "__call__", counted)
    frames = [np.random.default_rng(i).integers(0, 256, (136, 200, 3), np.uint8) for i in range(2)]
    (tmp_path / "frames").mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / "frames" / f"{i}.png")
    out = run({"root": tmp_path}, str(tmp_path / "frames"), "--model",
              str(tmp_path / "compact.safetensors"), "--latents", "fp32")
    got = latents_of(out)
    assert calls == [6, 6] and got.shape == (2, 6, 8)  # a 2 x 3 grid of 64x64 crops, one call
    with torch.no_grad():
        for f, z in zip(frames, got, strict=True):
            crops = crops_of(torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255, 64)
            crops = crops.mean(1, keepdim=True) if channels == 1 else crops  # grey: the mean
            assert torch.allclose(z, model.encode(crops), atol=1e-5)
    assert torch.equal(crops_of(torch.arange(2 * 128 * 192.0).reshape(1, 2, 128, 192), 64)[4],
                       torch.arange(2 * 128 * 192.0).reshape(2, 128, 192)[:, 64:, 64:128])


def test_crop_max_frames_and_irp_refinement(setup) -> None:
    out = run(setup, str(setup["video"]), "--model", str(setup["checkpoint"]),
              "--crop", "8,16,32,32", "--max-frames", "3", "--refine-steps", "4", name="refined")
    records = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all((r["height"], r["width"]) == (32, 32) for r in records)
    assert all(r["energy_final"] <= r["energy_initial"] for r in records)
    assert all(r["refine_steps"] >= 1 for r in records)


@pytest.mark.parametrize("extra, message", [
    (["--crop", "0,0,30,32"], "multiples of 8"),
    (["--crop", "40,0,32,32"], "does not fit"),
    (["--refine-steps", "3"], "needs an eager model"),
], ids=["crop side", "crop outside", "refine onnx"])
def test_bad_inputs_are_one_line_errors(setup, capsys, extra, message) -> None:
    status = main([str(setup["video"]), "--model", str(setup["onnx"]),
                   "--out-dir", str(setup["root"] / "bad"), *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err


def test_an_unreadable_picture_stops_the_reader_with_its_error(setup, tmp_path, capsys) -> None:
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "0.jpg").write_bytes(b"not a picture")
    assert main([str(tmp_path / "frames"), "--model", str(setup["onnx"]),
                 "--out-dir", str(tmp_path / "out")]) == 2
    assert "0.jpg" in capsys.readouterr().err


def test_sides_divisible_by_8(setup) -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        to_image(np.zeros((50, 80, 3), np.uint8), "bgr")


def test_missing_source(setup, capsys) -> None:
    assert main([str(setup["root"] / "nope.mp4"), "--model", str(setup["onnx"]),
                 "--out-dir", str(setup["root"] / "none")]) == 2
    assert "source not found" in capsys.readouterr().err
