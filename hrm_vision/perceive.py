"""``hrm-vision perceive SOURCE``: frames of a video, a camera or a folder in, latents out
(docs/export.md, "The frame pipeline"): ``latents.safetensors`` (or ``.npz``; :func:`read_latents`
gives float32 ``(N, C, H/8, W/8)``, a compact model's ``(N, crops, L)``), ``telemetry.jsonl``
and ``summary.json`` (fps, latency percentiles, share of the conv throughput) in ``--out-dir``."""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from . import vae
from ._extras import require
from .codes import fit_range, from_8bit, to_8bit
from .io import write_text
from .irp.registry import get_registry
from .irp.tinyvae import ImageFormat, load_student, to_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Graph precisions in the order a CPU runs them fastest, where the export timed none.
CPU_PREFERENCE = ("int8", "fp32", "fp16")


def setup_args(prog: str = "hrm-vision perceive") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Encode the frames of a video, a folder "
                                "of frames or a camera.")
    p.add_argument("source", help="video file, folder of image files, or camera index (0, 1..)")
    p.add_argument("--model", required=True, help="an export folder (its fastest graph that "
                   "passed the cost check), an ONNX encoder graph, .pth or .safetensors")
    p.add_argument("--precision", choices=CPU_PREFERENCE,
                   help="the graph of an export folder to use (default: the fastest that passed)")
    p.add_argument("--channel-order", choices=("bgr", "rgb"), help="of the frames as read "
                   "(default: the source's: bgr from OpenCV (video, camera), rgb from pictures)")
    p.add_argument("--crop", help="TOP,LEFT,HEIGHT,WIDTH in pixels (sides divisible by 8)")
    for flag, default, text in (
            ("--refine-steps", 1, "IRP states per frame, the encoder's included (1: plain)"),
            ("--threads", 2, "CPU threads"),
            ("--queue", 2, "frames read and converted ahead of the encoder"),
            ("--max-frames", 0, "stop after this many frames (0: all; a camera needs it)")):
        p.add_argument(flag, type=int, default=default, help=f"{text} (default {default})")
    p.add_argument("--latents", default="auto", choices=("auto", "fp16", "8bit", "fp32"),
                   help="fp16, 8bit (codes on each frame's channel ranges), fp32; auto (default): "
                   "fp16 unless larger than the frame")
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
    """``(H, W, 3)`` frames: a folder's pictures (name order) float32 RGB in [0, 1] by bit depth,
    a camera's (an integer) or a video file's uint8 BGR; at most ``max_frames`` (0: all)."""
    path = Path(source)
    if path.is_dir():
        from .data import read_image

        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {source}")
        for f in files[:max_frames or None]:
            yield read_image(f, "hrm-vision perceive")
        return
    cv2 = require("cv2", extra="video", purpose="hrm-vision perceive")
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
    """A ``(H, W, 3)`` frame in ``channel_order`` (uint8, or float in [0, 1]), cropped ->
    ``(1, 3, h, w)`` float RGB in [0, 1] (sides must be divisible by 8)."""
    if crop is not None:
        top, left, height, width = crop
        if top + height > frame.shape[0] or left + width > frame.shape[1]:
            raise ValueError(f"--crop {crop} does not fit in a {frame.shape[0]}x"
                             f"{frame.shape[1]} frame")
        frame = frame[top:top + height, left:left + width]
    return to_images(frame, ImageFormat(channel_order=channel_order))  # type: ignore[arg-type]


def crops_of(image: Tensor, side: int) -> Tensor:
    """The ``side`` x ``side`` crops tiling ``image`` ``(1, C, H, W)`` (a grid centred in it) as
    one batch ``(rows * cols, C, side, side)``, row by row."""
    _, c, h, w = image.shape
    rows, cols = h // side, w // side
    if not rows or not cols:
        raise ValueError(f"a {h}x{w} frame holds no {side}x{side} crop")
    top, left = (h - rows * side) // 2, (w - cols * side) // 2
    grid = image[0, :, top:top + rows * side, left:left + cols * side]
    return grid.reshape(c, rows, side, cols, side).permute(1, 3, 0, 2, 4).reshape(-1, c, side, side)


def pick_graph(folder: Path, precision: str | None = None) -> tuple[Path, str]:
    """The encoder of the export in ``folder`` and its precision: ``precision``'s, or the fastest
    (``export.json``'s frame latency, else :data:`CPU_PREFERENCE`) that passed its cost check."""
    report = folder / "export.json"
    if not report.is_file():
        raise FileNotFoundError(f"{folder} holds no export.json: not an export folder")
    result = json.loads(report.read_text())
    files, checks = result.get("precision_files", {}), result.get("cost_check", {})
    passed = [p for p in files if p == "fp32" or checks.get(p, {}).get("passed")]
    if precision is not None:
        if precision not in passed:
            raise ValueError(f"the export in {folder} has no {precision} graph that passed its "
                             f"cost check (it has {', '.join(passed)})")
        passed = [precision]
    ms = {k.split("_")[-1]: v["median_ms"] for k, v in result.get("frame_latency", {}).items()}
    best = min(passed, key=lambda p: (ms.get(p, 1e9), CPU_PREFERENCE.index(p)))
    return folder / Path(files[best]["encoder"]).name, best


class Encoder:
    """The encoder of ``model`` (an export folder, an ONNX graph, a checkpoint), refined by the
    ``tinyvae`` plugin when ``refine_steps`` > 1; a compact model encodes every crop of a frame
    in one batched call."""

    def __init__(self, model: str, threads: int, refine_steps: int = 1,
                 precision: str | None = None) -> None:
        self.plugin, self.backend, self.precision = None, "pytorch_eager", "fp32"
        path = Path(model)
        if path.is_dir():
            path, self.precision = pick_graph(path, precision)
        elif precision is not None:
            raise ValueError("--precision picks a graph of an export folder; --model is a file")
        if path.suffix == ".onnx":
            if refine_steps > 1:
                raise ValueError("--refine-steps needs an eager model (a .pth or .safetensors "
                                 "file): refinement decodes and differentiates the latent")
            import onnx

            from .export import onnx_runner

            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False
                                                      ).metadata_props}
            order = meta.get("color_order", "RGB")
            if not order.startswith(("RGB", "grey")):
                raise ValueError(f"{path} takes {order} images (metadata color_order); perceive "
                                 "gives graphs RGB: export the graph from a checkpoint")
            self.precision = meta.get("precision", "fp32").split(":")[0]
            self.vae = vae.build_model(meta["graph"].split()[0], **json.loads(meta["arch"]))
            self.encode, self.backend = onnx_runner(path, threads), "onnxruntime"
        else:
            self.vae = load_student(path)
            if refine_steps > 1:
                self.plugin = get_registry().create("tinyvae", {"checkpoint": str(path),
                                                                "max_steps": refine_steps})
            else:
                from .export import eager_runner

                self.encode = eager_runner(self.vae, "encode")
        self.path = str(path)
        self.crop_side: int | None = getattr(self.vae, "image_size", None)

    def model_input(self, image: Tensor) -> Tensor:
        """``image`` ``(1, 3, H, W)`` RGB as the model takes it: grey (the mean), its crops."""
        if self.vae.in_channels == 1:
            image = image.mean(1, keepdim=True)
        return image if self.crop_side is None else crops_of(image, self.crop_side)

    def __call__(self, image: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """The latent of ``image`` (1, 3, H, W) (compact: ``(crops, L)``) and its telemetry."""
        start = time.perf_counter()
        x = self.model_input(image)
        if self.plugin is None:
            latent = self.encode(x)
            return latent, {"encode_ms": 1e3 * (time.perf_counter() - start)}
        result = self.plugin.run(x)
        t = result.telemetry
        return result.state.x.detach(), {
            "refine_ms": 1e3 * (time.perf_counter() - start), "refine_steps": t["steps"],
            "energy_initial": t["energy_initial"], "energy_final": t["energy_final"]}


def read_ahead(frames: Iterator[np.ndarray], convert: Callable[[np.ndarray], Tensor],
               depth: int) -> Iterator[tuple[float, float, Tensor]]:
    """``(start, read_ms, image)`` per frame, read and converted by a thread at most ``depth``
    frames ahead; its error is raised here."""
    ahead: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item: Any) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                return ahead.put(item, timeout=0.1)

    def work() -> None:
        try:
            while not stop.is_set():
                start = time.perf_counter()
                frame = next(frames, None)
                if frame is None:
                    break
                image = convert(frame)
                put((start, 1e3 * (time.perf_counter() - start), image))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            put(exc)
        put(done)

    (thread := threading.Thread(target=work, name="perceive-reader", daemon=True)).start()
    try:
        while (item := ahead.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def store(latents: list[Tensor], precision: str) -> dict[str, Tensor]:
    """Stacked ``latents`` (one per frame) in ``precision`` (fp16, 8bit, fp32); 8bit adds each
    frame's per-channel ``latent_low`` and ``latent_step`` ``(N, C)`` float32."""
    if precision != "8bit":
        return {"latents": torch.stack(latents).to(getattr(torch, f"float{precision[2:]}"))}
    low, step = (torch.stack(r) for r in zip(*map(fit_range, map(_nc, latents)), strict=True))
    return {"latents": torch.stack([to_8bit(_nc(z), lo, st).reshape(z.shape)
                                    for z, lo, st in zip(latents, low, step, strict=True)]),
            "latent_low": low, "latent_step": step}


def _nc(z: Tensor) -> Tensor:  # one frame's latent as (N, C, ...): (1, C, h, w), or (crops, L)
    return z if z.dim() == 2 else z[None]


def read_latents(path: str | Path) -> Tensor:
    """The float32 latents of a :func:`perceive` latents file (``.safetensors`` or ``.npz``)."""
    if str(path).endswith(".npz"):
        with np.load(path) as f:
            tensors = {k: torch.from_numpy(f[k]) for k in f.files}
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    z = tensors["latents"]
    if z.dtype != torch.uint8:
        return z.float()
    return torch.stack([from_8bit(_nc(q), lo, st).reshape(q.shape) for q, lo, st in
                        zip(z, tensors["latent_low"], tensors["latent_step"], strict=True)])


def perceive(args: argparse.Namespace) -> dict[str, Any]:
    """Run the pipeline the parsed options describe; returns the summary."""
    torch.set_num_threads(args.threads)
    crop = parse_crop(args.crop) if args.crop is not None else None
    # the source's channel order: a folder's pictures decode RGB (PIL), video and camera BGR (cv2)
    order = args.channel_order or ("rgb" if Path(args.source).is_dir() else "bgr")
    encoder = Encoder(args.model, args.threads, args.refine_steps, args.precision)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    latents: list[Tensor] = []
    records: list[dict[str, Any]] = []
    first: Tensor | None = None
    start = time.perf_counter()
    frames = read_ahead(read_frames(args.source, args.max_frames),
                        lambda f: to_image(f, order, crop), args.queue)
    with open(out / "telemetry.jsonl", "w") as log:
        for t0, read_ms, image in frames:
            first = image if first is None else first
            queued_ms = 1e3 * (time.perf_counter() - t0) - read_ms
            latent, timing = encoder(image)
            latents.append(latent[0] if encoder.crop_side is None else latent)
            record = {"frame": len(records), "height": image.shape[2], "width": image.shape[3],
                      "latent_shape": list(latents[-1].shape), "read_ms": read_ms,
                      "queued_ms": queued_ms, **timing,
                      "total_ms": 1e3 * (time.perf_counter() - t0)}
            log.write(json.dumps(record) + "\n")
            records.append(record)
    wall = time.perf_counter() - start
    if first is None:
        raise ValueError(f"no frames read from {args.source}")
    frame_bytes = first.shape[1] * first.shape[2] * first.shape[3]  # uint8 pixels
    precision = args.latents if args.latents != "auto" else \
        "fp16" if 2 * latents[0].numel() <= frame_bytes else "8bit"  # fp16 if not over the frame
    tensors = {**store(latents, precision), "frame_index": torch.arange(len(latents))}
    path = out / f"latents.{args.format}"
    if args.format == "npz":
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={
            "latent": "posterior mean per frame, (N, C, H/8, W/8) (a compact model's "
                      "(N, crops, L), its crops row by row)",
            "precision": precision, "decode": "8bit: latent_low + latent_step * code per frame "
            "and channel (hrm_vision.perceive.read_latents)",
            "image_convention": "float [0, 1], RGB, NCHW"})
    fps = len(records) / wall
    from .evaluate import conv_reference  # this machine's conv throughput, on these threads
    from .timing import timings
    conv, conv_flops = conv_reference(first.shape[2], first.shape[3])
    with torch.inference_mode():
        gflops = conv_flops / timings({"c": conv}, 5, 1, desc="conv")["c"]["median_ms"] / 1e6
    x = encoder.model_input(first)  # the encoder's FLOPs per frame, as vae.count_macs counts
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder.vae.encode(x)
    model_gflops = counter.get_total_flops() * fps / 1e9
    summary = {"source": args.source, "model": encoder.path, "backend": encoder.backend,
               "precision": encoder.precision, "threads": args.threads,
               "frames": len(records), "wall_s": wall, "fps": fps,
               **{f"{name}_p{q}_ms": float(np.percentile([r[k] for r in records], q))
                  for k, name in (("total_ms", "latency"), ("encode_ms", "encode"))
                  if k in records[0] for q in (50, 90, 99)},
               "frame_size": f"{first.shape[2]}x{first.shape[3]}",
               "crops_per_frame": len(x) if encoder.crop_side else 0,
               "encoder_gflops": model_gflops, "conv_reference_gflops": gflops,
               "conv_share": model_gflops / gflops,
               "refine_steps": args.refine_steps, "channel_order": order,
               "latents": {"precision": precision, "file": str(path),
                           "bytes_per_frame": path.stat().st_size / len(records),
                           "frame_bytes": frame_bytes},
               "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    return summary


def command(argv: Sequence[str] | None = None, prog: str = "hrm-vision perceive") -> int:
    """Run ``hrm-vision perceive``: 0; a bad source, model or crop raises ``ValueError`` or
    ``OSError`` for the caller to print in one line."""
    parser = setup_args(prog)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.max_frames < 0 or args.refine_steps < 1 or args.queue < 1:
        parser.error("--threads, --queue and --refine-steps must be >= 1, --max-frames >= 0")
    s = perceive(args)
    print(f"{s['frames']} frames of {s['frame_size']} from {s['source']} in {s['wall_s']:.2f} s: "
          f"{s['fps']:.2f} fps ({s['backend']} {s['precision']}, {s['threads']} threads; latency "
          f"p50/p90/p99 {s['latency_p50_ms']:.1f}/{s['latency_p90_ms']:.1f}/"
          f"{s['latency_p99_ms']:.1f} ms; {100 * s['conv_share']:.0f}% of the conv throughput); "
          f"latents {s['latents']['precision']}, {s['latents']['bytes_per_frame'] / 1e3:.0f} kB "
          f"per frame (frame {s['latents']['frame_bytes'] / 1e3:.0f} kB); wrote {args.out_dir}")
    return 0
