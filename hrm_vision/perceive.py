"""``hrm-vision perceive SOURCE``: encode every frame of a video, a camera or a folder of frames.

::

    hrm-vision perceive video.mp4 --model exports/tinyvae_encoder.int8.onnx \\
        --channel-order bgr --out-dir perceived --threads 2
    hrm-vision perceive 0 --model checkpoints/tinyvae_best.pth --channel-order bgr \\
        --max-frames 300                       # camera 0
    hrm-vision perceive frames/ --model tinyvae.safetensors --channel-order bgr \\
        --crop 0,0,64,64 --refine-steps 8      # a 64x64 crop of each frame, IRP-refined

SOURCE is a video file, a folder of image files (read in name order) or a camera index; frames
are read with OpenCV (the ``video`` extra: ``pip install 'hrm-vision[video]'``), which delivers
uint8 frames in BGR order: ``--channel-order`` says which order the source's frames are in, and
is required, so a colour swap is never silent. Each frame (optionally cropped, ``--crop
TOP,LEFT,HEIGHT,WIDTH``; sides divisible by 8) becomes a float image in [0, 1], RGB, NCHW and is
encoded by ``--model``: an ONNX encoder graph (``tinyvae_encoder[.fp16|.int8].onnx``, run by
ONNX Runtime with ``--threads``) or a checkpoint or ``.safetensors`` file (eager PyTorch). With
``--refine-steps N`` (N > 1) the latent is refined by the ``tinyvae`` IRP plugin (through
:func:`hrm_vision.irp.create_plugin`; eager models only).

Writes into ``--out-dir``: ``latents.safetensors`` (or ``latents.npz``: ``--format npz``) with
``latents`` (N, C, H/8, W/8) float32 and ``frame_index`` (N,) int64, ``telemetry.jsonl`` (one
JSON record per frame: read, encode, refine and total milliseconds, sizes) and ``summary.json``
(frames, wall time, frames per second, median and p90 latency); the summary is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._extras import require
from .io import write_text

PROG = "hrm-vision perceive"
#: Image files a folder source is read from.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def setup_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Encode every frame of a video file, a "
                                "folder of frames or a camera; write latents and telemetry.")
    p.add_argument("source", help="video file, folder of image files, or camera index (0, 1..)")
    p.add_argument("--model", required=True,
                   help="ONNX encoder graph (.onnx), checkpoint (.pth) or .safetensors file")
    p.add_argument("--channel-order", required=True, choices=("bgr", "rgb"),
                   help="channel order of the source's frames (OpenCV delivers bgr)")
    p.add_argument("--crop", help="TOP,LEFT,HEIGHT,WIDTH in pixels (sides divisible by 8)")
    p.add_argument("--refine-steps", type=int, default=1,
                   help="IRP refinement states per frame, the encoder's guess included; 1 (the "
                        "default) is the plain encoder")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--max-frames", type=int, default=0,
                   help="stop after this many frames (0: the whole source; a camera needs it)")
    p.add_argument("--out-dir", default="perceived", help="output folder (default %(default)s)")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "npz"),
                   help="latents file format (default %(default)s)")
    return p


def parse_crop(text: str | None) -> tuple[int, int, int, int] | None:
    """``"TOP,LEFT,HEIGHT,WIDTH"`` -> a tuple; sides positive multiples of 8."""
    if text is None:
        return None
    try:
        top, left, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--crop is TOP,LEFT,HEIGHT,WIDTH, got {text!r}") from None
    if top < 0 or left < 0 or height < 8 or width < 8 or height % 8 or width % 8:
        raise ValueError(f"--crop needs TOP, LEFT >= 0 and sides that are positive multiples "
                         f"of 8, got {text!r}")
    return top, left, height, width


def read_frames(source: str, max_frames: int = 0) -> Iterator[np.ndarray]:
    """uint8 ``(H, W, 3)`` frames of ``source`` as OpenCV reads them (BGR): a folder's image
    files in name order, a camera (an integer) or a video file."""
    cv2 = require("cv2", extra="video", purpose=PROG)
    count = 0
    path = Path(source)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {source}")
        for f in files:
            frame = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if frame is None:
                raise ValueError(f"cannot read image {f}")
            yield frame
            count += 1
            if count == max_frames:
                return
        return
    if not source.isdigit() and not path.is_file():
        raise FileNotFoundError(f"source not found: {source} (a video file, a folder of frames "
                                "or a camera index)")
    capture = cv2.VideoCapture(int(source) if source.isdigit() else str(path))
    if not capture.isOpened():
        raise ValueError(f"OpenCV cannot open {source}")
    try:
        while not max_frames or count < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            yield frame
            count += 1
    finally:
        capture.release()


def to_image(frame: np.ndarray, channel_order: str,
             crop: tuple[int, int, int, int] | None = None) -> Tensor:
    """A uint8 ``(H, W, 3)`` frame in ``channel_order`` -> ``(1, 3, h, w)`` float in [0, 1],
    RGB, NCHW, cropped to ``crop``; sides must be divisible by 8."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected uint8 (H, W, 3) frames, got {frame.dtype} {frame.shape}")
    if crop is not None:
        top, left, height, width = crop
        if top + height > frame.shape[0] or left + width > frame.shape[1]:
            raise ValueError(f"--crop {crop} does not fit in a {frame.shape[0]}x"
                             f"{frame.shape[1]} frame")
        frame = frame[top:top + height, left:left + width]
    if frame.shape[0] % 8 or frame.shape[1] % 8:
        raise ValueError(f"frame sides must be divisible by 8, got {frame.shape[0]}x"
                         f"{frame.shape[1]}; pass --crop")
    if channel_order == "bgr":
        frame = frame[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255.0


class Encoder:
    """The frame encoder ``--model`` names, with optional IRP refinement."""

    def __init__(self, model: str, threads: int, refine_steps: int = 1) -> None:
        from .export.runtime import eager_runner, onnx_runner

        self.plugin = None
        self.refine_steps = refine_steps
        if model.endswith(".onnx"):
            if refine_steps > 1:
                raise ValueError("--refine-steps needs an eager model (a .pth or .safetensors "
                                 "file): refinement decodes and differentiates the latent")
            self.encode = onnx_runner(model, threads)
            self.backend = "onnxruntime"
        else:
            from .io import load

            self.encode = eager_runner(load(model), "encode")
            self.backend = "pytorch_eager"
            if refine_steps > 1:
                from .irp import create_plugin

                self.plugin = create_plugin("tinyvae", {"checkpoint": model,
                                                        "max_steps": refine_steps})

    def __call__(self, image: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """The latent of ``image`` (1, 3, H, W) and what the frame's telemetry adds."""
        start = time.perf_counter()
        if self.plugin is None:
            latent = self.encode(image)
            return latent, {"encode_ms": 1e3 * (time.perf_counter() - start)}
        result = self.plugin.run(image)
        t = result.telemetry
        return result.state.x.detach(), {
            "refine_ms": 1e3 * (time.perf_counter() - start), "refine_steps": t["steps"],
            "energy_initial": t["energy_initial"], "energy_final": t["energy_final"]}


def perceive(args: argparse.Namespace) -> dict[str, Any]:
    """Run the pipeline the parsed options describe; returns the summary."""
    torch.set_num_threads(args.threads)
    crop = parse_crop(args.crop)
    encoder = Encoder(args.model, args.threads, args.refine_steps)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    latents: list[Tensor] = []
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    frames = read_frames(args.source, args.max_frames)
    with open(out / "telemetry.jsonl", "w") as log:
        while True:
            t0 = time.perf_counter()
            frame = next(frames, None)
            if frame is None:
                break
            image = to_image(frame, args.channel_order, crop)
            read_ms = 1e3 * (time.perf_counter() - t0)
            latent, timing = encoder(image)
            latents.append(latent[0])
            record = {"frame": len(records), "height": image.shape[2], "width": image.shape[3],
                      "latent_shape": list(latent.shape[1:]), "read_ms": read_ms, **timing,
                      "total_ms": 1e3 * (time.perf_counter() - t0)}
            log.write(json.dumps(record) + "\n")
            records.append(record)
    wall = time.perf_counter() - start
    if not records:
        raise ValueError(f"no frames read from {args.source}")
    _write_latents(out, torch.stack(latents), args.format)
    total = np.array([r["total_ms"] for r in records])
    summary = {"source": args.source, "model": args.model, "backend": encoder.backend,
               "threads": args.threads, "frames": len(records), "wall_s": wall,
               "fps": len(records) / wall, "latency_median_ms": float(np.median(total)),
               "latency_p90_ms": float(np.percentile(total, 90)),
               "frame_size": f"{records[0]['height']}x{records[0]['width']}",
               "refine_steps": args.refine_steps, "channel_order": args.channel_order,
               "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    return summary


def _write_latents(out: Path, latents: Tensor, fmt: str) -> Path:
    index = torch.arange(latents.shape[0], dtype=torch.int64)
    if fmt == "npz":
        path = out / "latents.npz"
        np.savez(path, latents=latents.numpy(), frame_index=index.numpy())
        return path
    from safetensors.torch import save_file

    path = out / "latents.safetensors"
    save_file({"latents": latents.contiguous(), "frame_index": index}, str(path),
              metadata={"latent": "posterior mean per frame, (N, C, H/8, W/8) float32",
                        "image_convention": "float [0, 1], RGB, NCHW"})
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run; exit status 0, or 2 for a bad option, source or model (one
    line on standard error, :func:`hrm_vision.cli.run_main`)."""
    from .cli import run_main

    return run_main(PROG, _run, argv)


def _run(argv: list[str] | None) -> int:
    parser = setup_args()
    args = parser.parse_args(argv)
    if args.threads < 1 or args.max_frames < 0 or args.refine_steps < 1:
        parser.error("--threads and --refine-steps must be >= 1, --max-frames >= 0")
    s = perceive(args)
    print(f"{s['frames']} frames of {s['frame_size']} from {s['source']} in {s['wall_s']:.2f} s: "
          f"{s['fps']:.2f} fps ({s['backend']}, {s['threads']} threads; latency median "
          f"{s['latency_median_ms']:.1f} ms, p90 {s['latency_p90_ms']:.1f} ms); wrote "
          f"{args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
