"""``hrm-vision perceive``: a video, a folder of frames -> latents and telemetry, on a small video
this test writes itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hrm_vision.cli import main as cli_main
from hrm_vision.export import export_model
from hrm_vision.io import model_entry, save_checkpoint
from hrm_vision.perceive import to_image
from tests.helpers.models import perturbed_student

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
        cv2.imwrite(str(folder / f"{i:03d}.png"), f)
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


def test_video_with_the_onnx_encoder(setup, capsys) -> None:
    out = run(setup, str(setup["video"]), "--model", str(setup["onnx"]), "--channel-order",
              "bgr", name="video")
    from safetensors.torch import load_file

    tensors = load_file(str(out / "latents.safetensors"))
    assert tensors["latents"].shape == (FRAMES, 8, HEIGHT // 8, WIDTH // 8)
    assert torch.equal(tensors["frame_index"], torch.arange(FRAMES))
    records = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(FRAMES))
    assert all(r["encode_ms"] > 0 and r["total_ms"] >= r["encode_ms"] for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == FRAMES and summary["fps"] > 0
    assert summary["backend"] == "onnxruntime" and summary["frame_size"] == f"{HEIGHT}x{WIDTH}"
    assert f"{FRAMES} frames of {HEIGHT}x{WIDTH}" in capsys.readouterr().out


def test_folder_latents_equal_the_model_on_rgb_frames(setup) -> None:
    """The latents are the model's on the frames converted BGR -> RGB; saying rgb for BGR frames
    gives other latents (the channel order matters and is applied)."""
    model = perturbed_student()
    expected = torch.cat([model.encode(to_image(f, "bgr")) for f in bgr_frames()]).detach()
    got = {}
    for order in ("bgr", "rgb"):
        out = run(setup, str(setup["folder"]), "--model", str(setup["checkpoint"]),
                  "--channel-order", order, "--format", "npz", name=f"folder_{order}")
        got[order] = torch.from_numpy(np.load(out / "latents.npz")["latents"])
    assert (got["bgr"] - expected).abs().max() < 1e-5
    assert (got["rgb"] - expected).abs().max() > 1e-2
    first = to_image(bgr_frames()[0], "bgr")
    assert first[0, 0, 0, 0] > 0.8 and first[0, 2, 0, 0] == 0  # red is channel 0 (RGB)


def test_the_exported_safetensors_weights_give_the_checkpoint_latents(setup) -> None:
    """``--model exports/tinyvae.safetensors`` (what the export writes) runs through the same
    loader as the ``.pth`` checkpoint and gives the same latents."""
    got = {}
    for name, model in (("pth", setup["checkpoint"]),
                        ("safetensors", setup["root"] / "exports" / "tinyvae.safetensors")):
        out = run(setup, str(setup["folder"]), "--model", str(model), "--channel-order", "bgr",
                  "--format", "npz", name=f"weights_{name}")
        got[name] = np.load(out / "latents.npz")["latents"]
    assert got["pth"].shape == (FRAMES, 8, HEIGHT // 8, WIDTH // 8)
    assert np.array_equal(got["pth"], got["safetensors"])


def test_crop_max_frames_and_irp_refinement(setup) -> None:
    out = run(setup, str(setup["video"]), "--model", str(setup["checkpoint"]),
              "--channel-order", "bgr", "--crop", "8,16,32,32", "--max-frames", "3",
              "--refine-steps", "4", name="refined")
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
    status = main([str(setup["video"]), "--model", str(setup["onnx"]), "--channel-order", "bgr",
                   "--out-dir", str(setup["root"] / "bad"), *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err


def test_channel_order_is_required_and_sides_divisible_by_8(setup, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(setup["video"]), "--model", str(setup["onnx"])])
    assert info.value.code == 2 and "--channel-order" in capsys.readouterr().err
    with pytest.raises(ValueError, match="divisible by 8"):
        to_image(np.zeros((50, 80, 3), np.uint8), "bgr")


def test_missing_source(setup, capsys) -> None:
    assert main([str(setup["root"] / "nope.mp4"), "--model", str(setup["onnx"]),
                 "--channel-order", "bgr", "--out-dir", str(setup["root"] / "none")]) == 2
    assert "source not found" in capsys.readouterr().err
