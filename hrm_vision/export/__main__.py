"""``python -m hrm_vision.export``: the TinyVAE for the edge, ONNX (ONNX Runtime, TensorRT) and
TorchScript, checked against eager PyTorch on real validation photographs.

``python -m hrm_vision.export --checkpoint checkpoints/tinyvae_best.pth --out-dir exports``
writes the encoder and decoder (ONNX and TorchScript; fp16 and int8 ONNX with ``--precision``),
the teacher-space encoder (ONNX, when the checkpoint holds the latent adapter), the weights and
``export.json`` (see :mod:`hrm_vision.export`). Every graph takes any height and width divisible
by 8; each is checked at several frame sizes, each precision's cost is measured.

A compact student (``compact_student``, a vector latent per fixed-size crop) exports the same
files with its crop fixed: ``image`` ``(N, C, 64, 64)`` -> ``latent`` ``(N, 64)`` and back, only
the batch dynamic; parity and latency are checked on validation crops of that side
(``--parity-sizes`` and ``--frame-size`` do not apply), grey (``input_channels=1``) models on
their mean over the colours.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from ..compact import CompactVAE
from ..data import validation_images
from ..io import ADAPTER_ROLE, load_checkpoint, model_from_payload, roles_in, write_text
from ..vae import VAEBase
from .frames import parse_size, parse_sizes, photo_frames
from .graphs import ExportError
from .onnx import DEFAULT_OPSET
from .parity import PARITY_TOLERANCE, compare_runtimes, frame_latency, size_key
from .pipeline import ExportResult, write_export
from .precision import parse_precisions
from .runtime import Runner, chain, eager_runner, onnx_runner
from .staging import ExportSet

PROG = "python -m hrm_vision.export"

#: TensorRT optimisation profiles: (min, opt, max) as (batch, height, width) of the image; from a
#: 32x32 crop through a VGA camera frame to a 1080p frame.
TRT_PROFILE = ((1, 32, 32), (1, 480, 640), (4, 1080, 1920))

TENSORRT_NOTE = """\
TensorRT on a Jetson (NOT run here; no TensorRT on this machine), with the files above; dynamic
batch, height and width, profile from a 32x32 crop (min) through a 480x640 frame (opt) to four
1080x1920 frames (max):
  trtexec --onnx=tinyvae_encoder.onnx --saveEngine=tinyvae_encoder_fp16.engine --fp16 \\
          --minShapes=image:{emin} --optShapes=image:{eopt} --maxShapes=image:{emax}
  trtexec --onnx=tinyvae_decoder.onnx --saveEngine=tinyvae_decoder_fp16.engine --fp16 \\
          --minShapes=latent:{dmin} --optShapes=latent:{dopt} --maxShapes=latent:{dmax}
  int8 from the calibrated QDQ graph (explicit quantisation; same shapes):
  trtexec --onnx=tinyvae_encoder.int8.onnx --saveEngine=tinyvae_encoder_int8.engine --int8 --fp16 \\
          --minShapes=image:{emin} --optShapes=image:{eopt} --maxShapes=image:{emax}"""
TENSORRT_TEACHER_SPACE = """\
  trtexec --onnx=tinyvae_encoder_teacher_space.onnx --fp16 \\
          --saveEngine=tinyvae_encoder_teacher_space_fp16.engine \\
          --minShapes=image:{emin} --optShapes=image:{eopt} --maxShapes=image:{emax}"""
TENSORRT_COMPACT_NOTE = """\
TensorRT on a Jetson (NOT run here; no TensorRT on this machine), with the files above; fixed
{side}x{side} crops, dynamic batch from 1 (min, opt) to 64 (max):
  trtexec --onnx=tinyvae_encoder.onnx --saveEngine=compact_encoder_fp16.engine --fp16 \\
          --minShapes=image:1x{c}x{side}x{side} --optShapes=image:1x{c}x{side}x{side} \\
          --maxShapes=image:64x{c}x{side}x{side}
  trtexec --onnx=tinyvae_decoder.onnx --saveEngine=compact_decoder_fp16.engine --fp16 \\
          --minShapes=latent:1x{latent} --optShapes=latent:1x{latent} \\
          --maxShapes=latent:64x{latent}"""


def trt_shapes(channels: int) -> dict[str, str]:
    """The ``--minShapes``/``--optShapes``/``--maxShapes`` values of :data:`TRT_PROFILE` for the
    encoder input (``e*``) and the decoder input with ``channels`` latent channels (``d*``)."""
    out = {}
    for name, (n, h, w) in zip(("min", "opt", "max"), TRT_PROFILE, strict=True):
        out[f"e{name}"] = f"{n}x3x{h}x{w}"
        out[f"d{name}"] = f"{n}x{channels}x{h // 8}x{w // 8}"
    return out


def setup_args() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export the TinyVAE encoder and decoder to ONNX and TorchScript, checked "
                    "against eager PyTorch on real validation images.")
    parser.add_argument("--checkpoint", default="checkpoints/tinyvae_best.pth",
                        help="checkpoint holding the student (default %(default)s)")
    parser.add_argument("--role", default="student",
                        help="model role inside the checkpoint (default %(default)s)")
    parser.add_argument("--out-dir", default="exports", help="output folder (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the validation crops of the main parity check and the "
                             "batch runtime comparison, divisible by 8 (default 32, a compact "
                             "model's crop side for it); the graphs of a spatial model take any "
                             "height and width divisible by 8")
    parser.add_argument("--precision", default="fp32,fp16,int8",
                        help="comma-separated precisions of the encoder and decoder graphs: "
                             "fp32 (always), fp16, int8 (default %(default)s)")
    parser.add_argument("--parity-sizes", default="64x64,224x224,480x640",
                        help="more frame sizes HxW every graph is checked at, on the photos "
                             "dataset's validation photographs (default %(default)s; '' none)")
    parser.add_argument("--calibration-images", type=int, default=256,
                        help="training images (at --image-size) calibrating the int8 graphs "
                             "(default 256)")
    parser.add_argument("--frame-size", default="480x640",
                        help="frame size HxW of the single-frame latency of each runtime and "
                             "precision (default %(default)s)")
    parser.add_argument("--frame-repeats", type=int, default=5,
                        help="interleaved rounds of the single-frame latency; 0 skips it "
                             "(default 5)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (18)")
    parser.add_argument("--dataset", default="photos",
                        help="dataset whose validation images check parity (default photos)")
    parser.add_argument("--data-dir", default="./data", help="dataset root (if it needs one)")
    parser.add_argument("--num-images", type=int, default=64,
                        help="validation images used for the parity check and the runtime "
                             "comparison's batch (default 64)")
    parser.add_argument("--timing-repeats", type=int, default=20,
                        help="interleaved rounds comparing eager PyTorch, ONNX Runtime and "
                             "TorchScript throughput; 0 skips it (default 20)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of the runtime comparison (default 1, as evaluate)")
    parser.add_argument("--no-teacher-space", action="store_true",
                        help="do not export tinyvae_encoder_teacher_space.onnx (image -> the "
                             "latent adapter's teacher-space latent), which is written by "
                             "default when the checkpoint holds the adapter")
    return parser


def run(args: argparse.Namespace) -> tuple[VAEBase, ExportResult]:
    """Load, export, check and (``--timing-repeats``) time; writes ``export.json``."""
    torch.set_num_threads(args.threads)
    payload = load_checkpoint(args.checkpoint)
    vae = model_from_payload(payload, args.role, source=args.checkpoint)
    compact = isinstance(vae, CompactVAE)
    if compact and args.image_size not in (None, vae.image_size):
        raise ValueError(f"--image-size {args.image_size}: the compact model's graphs take "
                         f"{vae.image_size}x{vae.image_size} crops only (leave --image-size out)")
    if args.image_size is None:
        args.image_size = vae.image_size if compact else 32
    if compact:  # the graphs take the model's crop only
        args.parity_sizes = ()
    # the adapter reads the student's latent: the teacher-space encoder goes with the student
    adapter = None
    if args.role == "student" and not args.no_teacher_space \
            and ADAPTER_ROLE in roles_in(payload):
        adapter = model_from_payload(payload, ADAPTER_ROLE, source=args.checkpoint)
    images = model_images(vae, validation_images(args.dataset, args.num_images,
                                                 args.image_size, args.data_dir))
    calibration = None
    if "int8" in args.precision:
        calibration = model_images(vae, validation_images(
            args.dataset, args.calibration_images, args.image_size, args.data_dir, split="train"))
    frames = {size_key(f): model_images(vae, f)
              for f in (photo_frames(h, w) for h, w in args.parity_sizes)}
    # every file, export.json included, replaces the previous set whole (or nothing changes)
    with ExportSet(args.out_dir) as staged:
        result = write_export(vae, staged.folder, images, source=Path(args.checkpoint).name,
                              opset=args.opset, adapter=adapter, precisions=args.precision,
                              calibration=calibration, parity_images=frames)
        result.threads = args.threads
        if args.timing_repeats:
            result.throughput_ips = compare_runtimes(vae, result.files, images,
                                                     args.timing_repeats)
            result.throughput_batch = images.shape[0]
        if args.frame_repeats:
            frame = images[:1] if compact else model_images(vae, photo_frames(*args.frame_size)[:1])
            result.frame_size = size_key(frame)
            result.frame_latency = frame_latency(
                roundtrip_runners(vae, result.precision_files, args.threads), frame,
                args.frame_repeats)
        result = staged.relocate(result)
        write_text(json.dumps(asdict(result), indent=2) + "\n", staged.folder / "export.json")
    return vae, result


def summary(vae: VAEBase, result: ExportResult, args: argparse.Namespace) -> str:
    """What the command prints: files with their parity, runtimes, the TensorRT commands."""
    lines = [f"{key:28s} {path}  max |export - eager| = {result.max_abs_diff[key]:.2e}"
             for key, path in result.files.items()]
    for runtime, ips in result.throughput_ips.items():
        ratio = ips / result.throughput_ips["pytorch_eager"]
        lines.append(f"{runtime:14s} encode+decode batch {result.throughput_batch}: "
                     f"{ips:8.0f} img/s ({ratio:.2f}x eager)")
    sizes = ", ".join(result.parity_sizes)
    photographs = "" if isinstance(vae, CompactVAE) else " and the validation photographs"
    lines.append(f"parity of every fp32 file checked at {sizes} (tolerance {PARITY_TOLERANCE}) "
                 f"on {result.num_images} {args.dataset} validation images{photographs}")
    lines += precision_lines(result)
    for runtime, t in result.frame_latency.items():
        lines.append(f"{runtime:24s} encode+decode one {result.frame_size} frame: "
                     f"{t['median_ms']:8.1f} ms ({t['fps']:5.2f} fps), {result.threads} thread(s)")
    lines.append(f"report: {Path(args.out_dir) / 'export.json'}")
    if isinstance(vae, CompactVAE):
        lines.append(TENSORRT_COMPACT_NOTE.format(side=vae.image_size, c=vae.in_channels,
                                                  latent=vae.latent_dim))
        return "\n".join(lines)
    shapes = trt_shapes(vae.latent_dim)
    lines.append(TENSORRT_NOTE.format(**shapes))
    if "encoder_teacher_space_onnx" in result.files:
        lines.append(TENSORRT_TEACHER_SPACE.format(**shapes))
    return "\n".join(lines)


def model_images(vae: VAEBase, images: Tensor) -> Tensor:
    """RGB ``images`` (N, 3, H, W) as ``vae`` takes them: their mean over the colours for a grey
    model (``in_channels`` 1)."""
    return images.mean(1, keepdim=True) if vae.in_channels == 1 else images


def precision_lines(result: ExportResult) -> list[str]:
    """One line per precision and frame size: largest errors and PSNR cost against eager."""
    lines = []
    for precision, by_size in result.precision_costs.items():
        for key, c in by_size.items():
            lines.append(f"{precision} {key:>8s}: max |err| encoder {c['encoder_max_abs_err']:.1e}"
                         f" decoder {c['decoder_max_abs_err']:.1e} round trip "
                         f"{c['roundtrip_max_abs_err']:.1e}; PSNR {c['psnr_db']:.2f} dB "
                         f"(cost {c['psnr_cost_db']:+.3f} dB vs eager fp32)")
    return lines


def roundtrip_runners(vae: VAEBase, graphs: dict[str, dict[str, str]], threads: int
                      ) -> dict[str, Runner]:
    """Encode+decode runners: eager PyTorch (inference settings, :func:`eager_runner`) and ONNX
    Runtime with each precision's graphs."""
    runners = {"pytorch_eager": chain(eager_runner(vae, "encode"), eager_runner(vae, "decode"))}
    for precision, files in graphs.items():
        runners[f"onnxruntime_{precision}"] = chain(onnx_runner(files["encoder"], threads),
                                                    onnx_runner(files["decoder"], threads))
    return runners


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, export and check. Returns the exit status: 0, 1 when an export differs
    from eager PyTorch, 2 for a bad option, an unloadable checkpoint, a dataset problem, a file
    that cannot be written or a missing extra (one line on standard error,
    :func:`hrm_vision.cli.run_main`)."""
    from ..cli import run_main

    return run_main(PROG, _run, argv)


def _run(argv: list[str] | None) -> int:
    parser = setup_args()
    args = parser.parse_args(argv)
    if args.timing_repeats < 0 or args.threads < 1 or args.frame_repeats < 0 \
            or args.calibration_images < 1:
        parser.error("--timing-repeats and --frame-repeats must be >= 0, --threads and "
                     "--calibration-images >= 1")
    try:
        args.precision = parse_precisions(args.precision)
        args.parity_sizes = parse_sizes(args.parity_sizes)
        args.frame_size = parse_size(args.frame_size)
    except ValueError as exc:
        parser.error(str(exc))
    if args.role == ADAPTER_ROLE:
        parser.error("--role must name a VAE (student or teacher); the adapter is exported with "
                     "the student, as tinyvae_encoder_teacher_space.onnx")
    if (args.image_size is not None and (args.image_size < 8 or args.image_size % 8)) \
            or args.num_images < 1:
        parser.error(f"--image-size must be a positive multiple of 8 (got {args.image_size}) "
                     f"and --num-images >= 1 (got {args.num_images})")
    try:
        vae, result = run(args)
    except ExportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(summary(vae, result, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
