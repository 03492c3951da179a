"""``hrm-vision perceive SOURCE``: frames in, latents out, for a video, a camera or a folder
(docs/export.md, "The frame pipeline"). Writes into ``--out-dir``: ``latents.safetensors`` (or
``.npz``) with ``latents`` (N, C, H/8, W/8) float32 and ``frame_index`` (N,) int64;
``telemetry.jsonl`` (one record per frame); ``summary.json`` (frames, fps, latencies), printed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._extras import require
from .io import write_text
from .irp.registry import get_registry
from .irp.tinyvae import ImageFormat, load_student, to_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def setup_args(prog: str = "hrm-vision perceive") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Encode the frames of a video, a folder "
                                "of frames or a camera.")
    p.add_argument("source", help="video file, folder of image files, or camera index (0, 1..)")
    p.add_argument("--model", required=True, help="ONNX encoder graph, .pth or .safetensors")
    p.add_argument("--channel-order", required=True, choices=("bgr", "rgb"), help="of the frames")
    p.add_argument("--crop", help="TOP,LEFT,HEIGHT,WIDTH in pixels (sides divisible by 8)")
    for flag, default, text in (
            ("--refine-steps", 1, "IRP states per frame, the encoder's included (1: plain)"),
            ("--threads", 2, "CPU threads"),
            ("--max-frames", 0, "stop after this many frames (0: all; a camera needs it)")):
        p.add_argument(flag, type=int, default=default, help=f"{text} (default {default})")
    p.add_argument("--out-dir", default="perceived", help="output folder (default %(default)s)")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "npz"),
                   help="latents file format (default %(default)s)")
    return p


def parse_crop(text: str) -> tuple[int, int, int, int]:
    """``"TOP,LEFT,HEIGHT,WIDTH"`` -> a tuple (sides positive multiples of 8)."""
    try:
        top, left, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--crop is TOP,LEFT,HEIGHT,WIDTH, got {text!r}") from None
    if top < 0 or left < 0 or height < 8 or width < 8 or height % 8 or width % 8:
        raise ValueError(f"--crop needs TOP, LEFT >= 0 and sides that are positive multiples "
                         f"of 8, got {text!r}")
    return top, left, height, width


def read_frames(source: str, max_frames: int = 0) -> Iterator[np.ndarray]:
    """uint8 ``(H, W, 3)`` BGR frames of a folder's image files (in name order), a camera (an
    integer) or a video file; at most ``max_frames`` (0: all)."""
    cv2 = require("cv2", extra="video", purpose="hrm-vision perceive")
    path = Path(source)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {source}")
        for f in files[:max_frames or None]:
            if (frame := cv2.imread(str(f), cv2.IMREAD_COLOR)) is None:
                raise ValueError(f"cannot read image {f}")
            yield frame
        return
    if not source.isdigit() and not path.is_file():
        raise FileNotFoundError(f"source not found: {source} (a video file, a folder of frames "
                                "or a camera index)")
    capture = cv2.VideoCapture(int(source) if source.isdigit() else str(path))
    if not capture.isOpened():
        raise ValueError(f"OpenCV cannot open {source}")

    def frames() -> Iterator[np.ndarray]:
        while (read := capture.read())[0]:
            yield read[1]

    try:
        yield from islice(frames(), max_frames or None)
    finally:
        capture.release()


def to_image(frame: np.ndarray, channel_order: str,
             crop: tuple[int, int, int, int] | None = None) -> Tensor:
    """A ``(H, W, 3)`` frame in ``channel_order``, cropped -> ``(1, 3, h, w)`` float RGB in
    [0, 1] (sides must be divisible by 8)."""
    if crop is not None:
        top, left, height, width = crop
        if top + height > frame.shape[0] or left + width > frame.shape[1]:
            raise ValueError(f"--crop {crop} does not fit in a {frame.shape[0]}x"
                             f"{frame.shape[1]} frame")
        frame = frame[top:top + height, left:left + width]
    return to_images(frame, ImageFormat(channel_order=channel_order))  # type: ignore[arg-type]


class Encoder:
    """The encoder of ``--model``, refined by the ``tinyvae`` plugin when ``refine_steps`` > 1."""

    def __init__(self, model: str, threads: int, refine_steps: int = 1) -> None:
        self.plugin, self.backend = None, "pytorch_eager"
        if model.endswith(".onnx"):
            if refine_steps > 1:
                raise ValueError("--refine-steps needs an eager model (a .pth or .safetensors "
                                 "file): refinement decodes and differentiates the latent")
            from .export import onnx_runner

            self.encode, self.backend = onnx_runner(model, threads), "onnxruntime"
        elif refine_steps > 1:
            self.plugin = get_registry().create("tinyvae", {"checkpoint": model,
                                                            "max_steps": refine_steps})
        else:
            from .export import eager_runner

            self.encode = eager_runner(load_student(model), "encode")

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
    crop = parse_crop(args.crop) if args.crop is not None else None
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
    tensors = {"latents": torch.stack(latents), "frame_index": torch.arange(len(latents))}
    if args.format == "npz":
        np.savez(out / "latents.npz", **{k: v.numpy() for k, v in tensors.items()})
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(out / "latents.safetensors"),
                  metadata={"latent": "posterior mean per frame, (N, C, H/8, W/8) float32",
                            "image_convention": "float [0, 1], RGB, NCHW"})
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


def command(argv: Sequence[str] | None = None, prog: str = "hrm-vision perceive") -> int:
    """Run ``hrm-vision perceive``: 0; a bad source, model or crop raises ``ValueError`` or
    ``OSError`` for the caller to print in one line."""
    parser = setup_args(prog)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.max_frames < 0 or args.refine_steps < 1:
        parser.error("--threads and --refine-steps must be >= 1, --max-frames >= 0")
    s = perceive(args)
    print(f"{s['frames']} frames of {s['frame_size']} from {s['source']} in {s['wall_s']:.2f} s: "
          f"{s['fps']:.2f} fps ({s['backend']}, {s['threads']} threads; latency median "
          f"{s['latency_median_ms']:.1f} ms, p90 {s['latency_p90_ms']:.1f} ms); wrote "
          f"{args.out_dir}")
    return 0
