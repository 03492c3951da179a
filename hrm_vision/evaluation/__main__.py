"""``python -m hrm_vision.evaluation``: the distilled student against its teacher.

``python -m hrm_vision.evaluation --checkpoint-dir checkpoints`` writes ``evaluation.json``,
``evaluation.md`` and ``evaluation.png`` to ``--out-dir`` (default
``<checkpoint-dir>/evaluation``); see :mod:`hrm_vision.evaluation.run` for what is measured.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .run import EvaluationSettings

PROG = "python -m hrm_vision.evaluation"
#: Options that must be at least 1.
POSITIVE = ("num_images", "batch_size", "threads", "latency_repeats", "throughput_repeats",
            "throughput_batch")


def setup_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG,
                                description="Teacher vs student: size, speed, quality, CKA.")
    p.add_argument("--checkpoint-dir", default="checkpoints",
                   help="folder with teacher.pth and tinyvae_best.pth (default %(default)s)")
    p.add_argument("--teacher", help="teacher checkpoint (default <checkpoint-dir>/teacher.pth)")
    p.add_argument("--student",
                   help="student checkpoint (default <checkpoint-dir>/tinyvae_best.pth)")
    p.add_argument("--out-dir", help="output folder (default <checkpoint-dir>/evaluation)")
    p.add_argument("--dataset", default="photos", help="dataset name (default %(default)s)")
    p.add_argument("--data-dir", default="./data", help="dataset root, if it needs one")
    p.add_argument("--image-size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--num-images", type=int, default=1024,
                   help="validation images for quality and CKA, at least 2 (default 1024)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="batch size of the quality pass (default 128)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine, multi-threaded "
                        "timings of small convolutions measure threads waiting for each other)")
    p.add_argument("--latency-repeats", type=int, default=50,
                   help="timed rounds at batch 1 (default 50)")
    p.add_argument("--throughput-repeats", type=int, default=10,
                   help="timed rounds at the throughput batch (default 10)")
    p.add_argument("--throughput-batch", type=int, default=64,
                   help="batch size of the throughput measurement (default 64)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--baseline-train-images", type=int, default=4096,
                   help="training images the patch-PCA baseline is fitted on; 0 leaves the "
                        "baselines out (default 4096)")
    p.add_argument("--no-frames", action="store_true",
                   help="leave out the held-out photographs at full resolution (measured "
                        "with the photos dataset only)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the posterior samples that decode(z) decodes (default 0)")
    p.add_argument("--camera-repeats", type=int, default=3,
                   help="rounds of the student's single-frame timing at 64x64 and 480x640 "
                        "against this machine's 3x3 convolution; 0 skips it (default 3)")
    return p


def settings_from_args(args: argparse.Namespace, command: str) -> EvaluationSettings:
    """The settings the parsed options describe (default checkpoint paths filled in)."""
    from .run import EvaluationSettings

    ckpt = Path(args.checkpoint_dir)
    return EvaluationSettings(
        teacher=Path(args.teacher) if args.teacher else ckpt / "teacher.pth",
        student=Path(args.student) if args.student else ckpt / "tinyvae_best.pth",
        dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
        num_images=args.num_images, batch_size=args.batch_size,
        latency_repeats=args.latency_repeats, throughput_repeats=args.throughput_repeats,
        throughput_batch=args.throughput_batch, warmup=args.warmup,
        baseline_train_images=args.baseline_train_images, frames=not args.no_frames,
        seed=args.seed, camera_repeats=args.camera_repeats, command=command)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, evaluate, write and print the report. Returns the exit status: 0, or 2
    for a bad option, an unloadable checkpoint, a dataset problem, a file that cannot be
    written or a missing extra (one line on standard error, :func:`hrm_vision.cli.run_main`)."""
    from ..cli import run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_main(PROG, _run, argv)


def _run(argv: list[str] | None) -> int:
    import torch

    from .run import evaluate, write_report

    parser = setup_args()
    argv = list(argv or [])
    args = parser.parse_args(argv)
    bad = [f"--{n.replace('_', '-')}" for n in POSITIVE if getattr(args, n) < 1]
    if args.baseline_train_images < 0:
        bad.append("--baseline-train-images (>= 0)")
    if args.camera_repeats < 0:
        bad.append("--camera-repeats (>= 0)")
    if bad:
        parser.error(f"{', '.join(bad)} must be >= 1")
    torch.set_num_threads(args.threads)
    report = evaluate(settings_from_args(args, shlex.join([*PROG.split(), *argv])))
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.checkpoint_dir) / "evaluation"
    paths = write_report(report, out_dir)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
