"""``python -m hrm_vision.export``: the TinyVAE for the edge, ONNX (ONNX Runtime, TensorRT) and
TorchScript, checked against eager PyTorch on real validation photographs.

``python -m hrm_vision.export --checkpoint checkpoints/tinyvae_best.pth --out-dir exports``
writes the encoder and decoder (ONNX and TorchScript), the teacher-space encoder (ONNX, when
the checkpoint holds the latent adapter), the weights and ``export.json`` (see
:mod:`hrm_vision.export`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoints import ADAPTER_ROLE, load_checkpoint, model_from_payload, roles_in
from ..evaluation.quality import validation_images
from ..files import write_text
from ..vae import VAEBase
from .graphs import ExportError
from .onnx import DEFAULT_OPSET
from .parity import PARITY_TOLERANCE, compare_runtimes
from .pipeline import ExportResult, export_model

PROG = "python -m hrm_vision.export"

TENSORRT_NOTE = """\
TensorRT on a Jetson (NOT run here; no TensorRT on this machine), with the files above:
  trtexec --onnx=tinyvae_encoder.onnx --saveEngine=tinyvae_encoder_fp16.engine --fp16 \\
          --minShapes=image:1x3x{s}x{s} --optShapes=image:8x3x{s}x{s} --maxShapes=image:64x3x{s}x{s}
  trtexec --onnx=tinyvae_decoder.onnx --saveEngine=tinyvae_decoder_fp16.engine --fp16 \\
          --minShapes=latent:1x{latent} --optShapes=latent:8x{latent} \\
          --maxShapes=latent:64x{latent}"""
TENSORRT_TEACHER_SPACE = """\
  trtexec --onnx=tinyvae_encoder_teacher_space.onnx --fp16 \\
          --saveEngine=tinyvae_encoder_teacher_space_fp16.engine \\
          --minShapes=image:1x3x{s}x{s} --optShapes=image:8x3x{s}x{s} \\
          --maxShapes=image:64x3x{s}x{s}"""


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
    parser.add_argument("--image-size", type=int, default=32,
                        help="exported image side in pixels, divisible by 8 (default 32)")
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
    # the adapter reads the student's latent: the teacher-space encoder goes with the student
    adapter = None
    if args.role == "student" and not args.no_teacher_space \
            and ADAPTER_ROLE in roles_in(payload):
        adapter = model_from_payload(payload, ADAPTER_ROLE, source=args.checkpoint)
    images = validation_images(args.dataset, args.num_images, args.image_size, args.data_dir)
    result = export_model(vae, args.out_dir, images, source=Path(args.checkpoint).name,
                          opset=args.opset, adapter=adapter)
    if args.timing_repeats:
        result.throughput_ips = compare_runtimes(vae, result.files, images, args.timing_repeats)
        result.throughput_batch = images.shape[0]
    write_text(json.dumps(asdict(result), indent=2) + "\n", Path(args.out_dir) / "export.json")
    return vae, result


def summary(vae: VAEBase, result: ExportResult, args: argparse.Namespace) -> str:
    """What the command prints: files with their parity, runtimes, the TensorRT commands."""
    lines = [f"{key:28s} {path}  max |export - eager| = {result.max_abs_diff[key]:.2e}"
             for key, path in result.files.items()]
    for runtime, ips in result.throughput_ips.items():
        ratio = ips / result.throughput_ips["pytorch_eager"]
        lines.append(f"{runtime:14s} encode+decode batch {result.throughput_batch}: "
                     f"{ips:8.0f} img/s ({ratio:.2f}x eager)")
    lines.append(f"parity checked on {result.num_images} {args.dataset} validation images "
                 f"(tolerance {PARITY_TOLERANCE}); report: {Path(args.out_dir) / 'export.json'}")
    latent = "x".join(map(str, vae.latent_shape(args.image_size, args.image_size)))
    lines.append(TENSORRT_NOTE.format(s=args.image_size, latent=latent))
    if "encoder_teacher_space_onnx" in result.files:
        lines.append(TENSORRT_TEACHER_SPACE.format(s=args.image_size))
    return "\n".join(lines)


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
    if args.timing_repeats < 0 or args.threads < 1:
        parser.error("--timing-repeats must be >= 0 and --threads >= 1")
    if args.role == ADAPTER_ROLE:
        parser.error("--role must name a VAE (student or teacher); the adapter is exported with "
                     "the student, as tinyvae_encoder_teacher_space.onnx")
    if args.image_size < 8 or args.image_size % 8 or args.num_images < 1:
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
