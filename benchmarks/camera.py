"""The student on the robot: camera-resolution speed, each precision's cost, tiles, the pipeline.

``python benchmarks/camera.py [--checkpoint tinyvae_best.pth] [--threads 1]`` (run by
``make bench``) measures, in one process:

1. the export at every precision (fp32, fp16, int8 calibrated on training crops): parity at
   32x32 .. 480x640, each precision's largest error and PSNR cost against eager fp32 on the
   validation photographs (``export.json`` of :mod:`hrm_vision.export`);
2. single-frame encode+decode latency and fps for a 64x64 crop and a 480x640 frame: eager
   PyTorch as the model runs by default, eager with the inference settings of
   :func:`hrm_vision.export.eager_runner`, ONNX Runtime fp32 and int8, all interleaved
   with a 64-channel 3x3 convolution whose GFLOP/s is this machine's reference
   (:func:`hrm_vision.evaluate.camera_speed`);
3. tiled encode/decode of a 480x640 frame against the full frame (largest difference);
4. ``hrm-vision perceive`` on a 480x640 video this script writes (the validation photographs
   panning), with the int8 encoder on ``--perceive-threads`` threads.

Without ``--checkpoint`` the student is data-initialised (``init_from_data`` on 4096 training
crops: the patch-PCA start) and then trained alone for ``--train-steps`` steps (default 200;
``0.3 * MSE + 0.1 * KL``, 2 nats free bits, AdamW 3e-4, batch 32), so that its nonlinear stages
are non-zero (they start at zero) and quantisation and tiling are tested on all of them; it runs
exactly as fast as a fully trained one. Results go to ``--out`` (JSON) and are printed as
Markdown.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from hrm_vision.data import validation_images
from hrm_vision.evaluate import CAMERA_SIZES, camera_lines, camera_speed
from hrm_vision.export import (
    PARITY_SIZES,
    chain,
    eager_runner,
    export_model,
    onnx_runner,
    photo_frames,
)
from hrm_vision.io import load
from hrm_vision.tiling import decode_tiled, encode_tiled, receptive_field
from hrm_vision.timing import machine_info
from hrm_vision.vae import MinimalVAE, VAEBase


def student(checkpoint: str | None, steps: int) -> VAEBase:
    """The checkpoint's student, or a data-initialised one trained alone for ``steps`` steps."""
    if checkpoint:
        return load(checkpoint)
    from hrm_vision.train.loss import DistillLoss

    torch.manual_seed(0)
    train = validation_images("photos", 4096, 32, split="train")
    model = MinimalVAE()
    model.init_from_data(train)
    loss_fn = DistillLoss(distill_latent_weight=0.0, distill_recon_weight=0.0,
                          perceptual_weight=0.0)
    loss_fn.calibrate(model, train[:256])
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=3e-4)
    model.train()
    for _ in range(steps):
        x = train[torch.randint(0, train.shape[0], (32,))]
        loss = loss_fn(x, model(x), None, None)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def write_video(path: Path, frames: int = 60) -> Path:
    """A 480x640 MJPG video: the validation photographs panning (BGR, as OpenCV writes)."""
    import cv2

    base = (photo_frames(480, 800).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    for i in range(frames):
        img = base[(i // 20) % base.shape[0]]
        shift = (i % 20) * 8
        writer.write(np.ascontiguousarray(img[:, shift:shift + 640, ::-1]))
    writer.release()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="student checkpoint (default: data-initialised)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the speed table")
    parser.add_argument("--perceive-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--out", default=".benchmarks/camera.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vae = student(args.checkpoint, args.train_steps)
    report: dict = {"student": args.checkpoint or f"data-initialised, trained alone for "
                                                  f"{args.train_steps} steps",
                    "machine": machine_info()}
    with tempfile.TemporaryDirectory() as tmp:
        crops = validation_images("photos", 64, 32)
        calibration = validation_images("photos", 256, 32, split="train")
        frames = {f"{h}x{w}": photo_frames(h, w) for h, w in PARITY_SIZES[1:]}
        result = export_model(vae, tmp, crops, source="benchmark",
                              precisions=("fp32", "fp16", "int8"), calibration=calibration,
                              parity_images=frames)
        report["parity_sizes"] = result.parity_sizes
        report["precision_costs"] = result.precision_costs
        graphs = result.precision_files
        runners = {
            "eager (default)": lambda x: vae.decode(vae.encode(x)),
            "eager (channels_last)": chain(eager_runner(vae, "encode"),
                                           eager_runner(vae, "decode")),
            **{f"onnxruntime {p}": chain(onnx_runner(graphs[p]["encoder"], args.threads),
                                         onnx_runner(graphs[p]["decoder"], args.threads))
               for p in ("fp32", "int8")}}
        report["camera"] = camera_speed(vae, runners, CAMERA_SIZES, args.repeats)
        frame = frames["480x640"][:1]
        field = receptive_field(vae)
        with torch.inference_mode():
            z = vae.encode(frame)
            full = vae.decode(z)
        report["tiling"] = {
            "receptive_field_px": field._asdict(), "tile_px": 128,
            "encode_max_abs_diff": float((encode_tiled(vae, frame, 128, field) - z).abs().max()),
            "decode_max_abs_diff": float((decode_tiled(vae, z, 128, field) - full).abs().max())}
        from hrm_vision.perceive import command as perceive

        video = write_video(Path(tmp) / "pan.avi")
        perceive([str(video), "--model", graphs["int8"]["encoder"], "--channel-order", "bgr",
                  "--threads", str(args.perceive_threads), "--out-dir", f"{tmp}/perceived"])
        report["perceive"] = json.loads(Path(f"{tmp}/perceived/summary.json").read_text())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(camera_lines(report["camera"], args.threads)))
    print("\n| precision | frame | max abs err encoder / decoder / round trip | PSNR cost |")
    print("|---|---|---|---|")
    for p, by_size in report["precision_costs"].items():
        for size, c in by_size.items():
            print(f"| {p} | {size} | {c['encoder_max_abs_err']:.1e} / "
                  f"{c['decoder_max_abs_err']:.1e} / {c['roundtrip_max_abs_err']:.1e} | "
                  f"{c['psnr_cost_db']:+.3f} dB |")
    t, s = report["tiling"], report["perceive"]
    print(f"\ntiles of 128 px, margins {t['receptive_field_px']}: max |tiled - full| encode "
          f"{t['encode_max_abs_diff']:.1e}, decode {t['decode_max_abs_diff']:.1e}")
    print(f"perceive {s['frames']} frames {s['frame_size']}, int8, {s['threads']} threads: "
          f"{s['fps']:.2f} fps (median {s['latency_median_ms']:.1f} ms per frame)")
    print(f"machine: {report['machine']['cpu']}, load {report['machine']['load_average_1_5_15min']}"
          f"; wrote {args.out}")


if __name__ == "__main__":
    main()
