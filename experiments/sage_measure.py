"""The SAGE drop-in on held-out 64x64 ``photos`` crops: plain encoder, refinement under SAGE's
halting, longer refinement, and (when ``sage`` imports) SAGE's own TinyVAE at random weights.

    python -m experiments.sage_measure [--checkpoint tinyvae_best.pth] [--sage-path CHECKOUT]

PSNR is pooled over the crops (:func:`hrm_vision.metrics.psnr`), images in [0, 1]; each row
also gives the numbers a crop's latent holds, the mean number of states used and the
milliseconds per crop (one crop per call, refinement and decoding, one torch thread).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from hrm_vision.data import PhotoCrops
from hrm_vision.irp.sage import create_tinyvae_irp
from hrm_vision.metrics import psnr

PROG = "python -m experiments.sage_measure"


def setup_args() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: untrained model")
    parser.add_argument("--sage-path", type=Path, default=None,
                        help="a SAGE checkout to compare with SAGE's own TinyVAE")
    parser.add_argument("--num-crops", type=int, default=256, help="validation crops")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 100],
                        help="max_iterations of the runs without early stopping")
    parser.add_argument("--seed", type=int, default=0, help="crops and SAGE's random weights")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = setup_args().parse_args(argv)
    torch.set_num_threads(1)
    crops = PhotoCrops("val", image_size=64, num_crops=args.num_crops, seed=args.seed)
    images = crops.images_uint8.float() / 255.0
    kwargs = {"device": "cpu", "latent_dim": 64, "input_channels": 3}
    if args.checkpoint is not None:
        kwargs = {"device": "cpu", "checkpoint": str(args.checkpoint)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plugin = create_tinyvae_irp(**kwargs)
    numbers = 1
    for side in plugin.latent_shape:
        numbers *= side
    rows = []
    runs = [("hrm-vision, plain encoder (1 state)", 1, True),
            ("hrm-vision, SAGE's halting (halt_eps 1e-4, K 3)", None, True)]
    runs += [(f"hrm-vision, {n} states", n, False) for n in args.steps]
    for label, max_steps, early in runs:
        recon, states, start = [], 0, time.perf_counter()
        for x in images.split(1):
            state, history = plugin.refine_states(x, None, max_steps, early)
            recon.append(plugin.decode_batch(state.x))
            states += len(history)
        ms = 1000.0 * (time.perf_counter() - start) / len(images)
        rows.append((label, numbers, psnr(torch.cat(recon), images), states / len(images), ms))
    if args.sage_path is not None:
        sys.path.insert(0, str(args.sage_path))
        sage_plugin = importlib.import_module("sage.irp.plugins.tinyvae_irp_plugin")
        torch.manual_seed(args.seed)
        sage = sage_plugin.create_tinyvae_irp(device="cpu", latent_dim=64, input_channels=3)
        start = time.perf_counter()
        recon = [sage.decode_batch(sage.refine(x)[0]) for x in images.split(1)]
        ms = 1000.0 * (time.perf_counter() - start) / len(images)
        rows.append(("SAGE's TinyVAE, random weights", 64, psnr(torch.cat(recon), images), 1.0,
                     ms))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {args.num_crops} photos val crops 64x64 (seed {args.seed}), checkpoint "
          f"{args.checkpoint or 'none (untrained)'}, {platform.machine()}, 1 thread, {when}")
    print("| model | numbers per crop | PSNR (dB) | states | ms / crop |\n|---|---|---|---|---|")
    for label, n, value, states, ms in rows:
        print(f"| {label} | {n} | {value:.2f} | {states:.1f} | {ms:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
