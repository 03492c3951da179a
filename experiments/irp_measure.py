"""Plain encoder vs latent refinement with the ``tinyvae`` plugin, on held-out photos crops.

    python -m experiments.irp_measure --checkpoint checkpoints/tinyvae_best.pth

For the bare model (``decode(encode(x))`` without the IRP loop), ``max_steps`` 1 (the plain
encoder output through the plugin) and each ``--steps`` value, on the ``photos``
validation crops (photographs never seen in training), reports: PSNR of the reconstruction over
all crops (pooled MSE, as :func:`hrm_vision.metrics.psnr`), milliseconds per image on the chosen
device (batches of ``--batch-size``, refinement plus decoding, after one warm-up batch, settings
interleaved batch by batch so background load hits them alike), the mean number of states used,
and the share of runs (one run = one image) whose energy never rose from one state to the next.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hrm_vision.data import PhotoCrops
from hrm_vision.irp import get_registry
from hrm_vision.irp.tinyvae import TinyVAEPlugin
from hrm_vision.metrics import psnr

#: The command's name in messages.
PROG = "python -m experiments.irp_measure"
#: The ``max_steps`` value standing for the bare model (``decode(encode(x))``, no IRP loop).
BARE = 0


def refine_batch(plugin: TinyVAEPlugin, images: torch.Tensor,
                 max_steps: int) -> tuple[torch.Tensor, float, torch.Tensor, int]:
    """Refine one batch: ``(reconstruction, seconds, never_rose (B,) bool, states used)``.

    ``max_steps=BARE`` times the bare model instead: what the plugin's bookkeeping (energies,
    telemetry) adds shows as the difference with ``max_steps=1``.
    """
    start = time.perf_counter()
    if max_steps == BARE:
        with torch.no_grad():
            reconstruction = plugin.model.decode(plugin.model.encode(images))
        seconds = time.perf_counter() - start
        return reconstruction, seconds, torch.ones(len(images), dtype=torch.bool), 1
    state, history = plugin.refine(images, max_steps=max_steps)
    reconstruction = plugin.decode(state.x)
    seconds = time.perf_counter() - start
    energies = torch.stack([s.meta["energies"] for s in history])  # (states, B)
    never_rose = (energies[1:] <= energies[:-1]).all(0)
    return reconstruction, seconds, never_rose, len(history)


def measure(plugin: TinyVAEPlugin, images: torch.Tensor, steps: Sequence[int],
            batch_size: int) -> list[dict[str, Any]]:
    """One row per setting over ``images`` (N, 3, H, W): the bare model, ``max_steps`` 1 (the
    plain encoder through the plugin), then each of ``steps``."""
    settings = [BARE, 1, *steps]
    batches = list(images.split(batch_size))
    refine_batch(plugin, batches[0], max(settings))  # warm-up, not timed
    recon: dict[int, list[torch.Tensor]] = {n: [] for n in settings}
    seconds = dict.fromkeys(settings, 0.0)
    never_rose: dict[int, list[torch.Tensor]] = {n: [] for n in settings}
    states = dict.fromkeys(settings, 0)
    for batch in tqdm(batches, desc="irp measure", unit="batch"):
        for n in settings:
            r, s, ok, used = refine_batch(plugin, batch, n)
            recon[n].append(r.cpu())
            seconds[n] += s
            never_rose[n].append(ok.cpu())
            states[n] += used
    rows = []
    for n in settings:
        rows.append({
            "max_steps": n,
            "psnr_db": psnr(torch.cat(recon[n]), images.cpu()),
            "ms_per_image": 1000.0 * seconds[n] / len(images),
            "mean_states": states[n] / len(batches),
            "energy_never_rose": float(torch.cat(never_rose[n]).float().mean()),
        })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| setting | PSNR (dB) | ms / image | states used | energy never rose |",
             "|---|---|---|---|---|"]
    for r in rows:
        n = r["max_steps"]
        label = {BARE: "bare model: decode(encode(x))",
                 1: "plugin, plain encoder (max_steps=1)"}.get(n, f"plugin, max_steps={n}")
        rose = "n/a" if n <= 1 else f"{100 * r['energy_never_rose']:.1f}%"
        lines.append(f"| {label} | {r['psnr_db']:.2f} | {r['ms_per_image']:.2f} | "
                     f"{r['mean_states']:.1f} | {rose} |")
    return "\n".join(lines)


def setup_args() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="TinyVAE checkpoint (role 'student'), e.g. tinyvae_best.pth")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20],
                        help="max_steps settings to compare with the plain encoder")
    parser.add_argument("--num-crops", type=int, default=512, help="validation crops")
    parser.add_argument("--batch-size", type=int, default=64, help="images per refine call")
    parser.add_argument("--seed", type=int, default=0, help="photos crop seed")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; an expected failure (bad value, unloadable checkpoint, missing file or
    extra) is one line on standard error and status 2 (see :func:`hrm_vision.cli.run_main`)."""
    from hrm_vision.cli import run_main

    return run_main(PROG, _run, argv)


def _run(argv: Sequence[str] | None) -> int:
    args = setup_args().parse_args(argv)
    if any(n < 1 for n in args.steps):
        raise ValueError(f"--steps values must be at least 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    plugin = get_registry().create("tinyvae", {"checkpoint": str(args.checkpoint),
                                           "device": args.device})
    assert isinstance(plugin, TinyVAEPlugin)
    images = PhotoCrops("val", num_crops=args.num_crops, seed=args.seed).images_uint8
    images = (images.float() / 255.0).to(plugin.device)
    rows = measure(plugin, images, args.steps, args.batch_size)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {args.checkpoint}, {args.num_crops} photos val crops (seed {args.seed}), "
          f"batch {args.batch_size}, device {args.device}, torch threads={args.threads}, "
          f"{platform.processor() or platform.machine()}, {when}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "date": when, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
