"""CPU latency and throughput of VAEs' encode, decode and both, measured interleaved; and the
student at camera resolution (a 64x64 crop, a 480x640 frame) against this machine's convolution
throughput, measured in the same rounds (:func:`camera_speed`, ``make bench``:
``benchmarks/camera.py``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import Tensor

from ..timing import interleaved_timings, summarize_timings
from ..vae import VAEBase

#: The operations timed for every model.
OPS = ("encode", "decode", "both")


def _ops(model: VAEBase, x: Tensor) -> dict[str, Callable[[], Tensor]]:
    z = model.encode(x)
    return {"encode": partial(model.encode, x), "decode": partial(model.decode, z),
            "both": lambda: model.decode(model.encode(x))}


@torch.inference_mode()
def measure_speed(models: dict[str, VAEBase], images: Tensor, latency_repeats: int,
                  throughput_repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Latency at batch 1 and throughput at batch ``len(images)``, all models interleaved.

    ``images``: ``(N, 3, H, W)`` in [0, 1]. Returns per model name: ``latency_{op}_median_ms``,
    ``latency_{op}_p90_ms`` and ``throughput_{op}_ips`` for op in encode, decode, both.
    """
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch, repeats in ((images[:1], latency_repeats), (images, throughput_repeats)):
        fns = {(name, op): fn for name, m in models.items() for op, fn in _ops(m, batch).items()}
        times = interleaved_timings({f"{n}/{op}": f for (n, op), f in fns.items()}, repeats,
                                    warmup, desc=f"timing batch {batch.shape[0]}")
        for (name, op) in fns:
            stats = summarize_timings(times[f"{name}/{op}"], batch.shape[0])
            if batch.shape[0] == 1:
                out[name][f"latency_{op}_median_ms"] = stats["median_ms"]
                out[name][f"latency_{op}_p90_ms"] = stats["p90_ms"]
            else:
                out[name][f"throughput_{op}_ips"] = stats["throughput_ips"]
    return out


#: Camera-resolution sizes (height, width): a 64x64 crop and a VGA frame.
CAMERA_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (480, 640))
#: The reference convolution: 64 channels in and out, 3x3, on a quarter-resolution feature map.
CONV_CHANNELS = 64


def conv_reference(height: int, width: int) -> tuple[Callable[[], Tensor], int]:
    """A 64-channel 3x3 convolution on ``(1, 64, height/4, width/4)`` (at least 8x8) and its
    FLOPs (2 per multiply-accumulate): what this CPU does for a plain convolution."""
    h, w = max(8, height // 4), max(8, width // 4)
    conv = torch.nn.Conv2d(CONV_CHANNELS, CONV_CHANNELS, 3, padding=1).eval()
    x = torch.rand(1, CONV_CHANNELS, h, w)
    return partial(conv, x), 2 * CONV_CHANNELS * CONV_CHANNELS * 9 * h * w


@torch.inference_mode()
def camera_speed(vae: VAEBase, runners: dict[str, Callable[[Tensor], Tensor]],
                 sizes: tuple[tuple[int, int], ...] = CAMERA_SIZES, repeats: int = 10,
                 warmup: int = 1) -> dict[str, dict[str, dict[str, float]]]:
    """Single-frame encode+decode latency of each runner at each size, and the achieved GFLOP/s
    against the reference convolution (:func:`conv_reference`) timed in the same rounds.

    ``runners``: ``{name: fn}`` with ``fn(x) -> reconstruction`` for a ``(1, 3, H, W)`` image in
    [0, 1] (see :mod:`hrm_vision.export.runtime`); all run ``vae``'s weights, so its
    multiply-accumulates (:func:`hrm_vision.vae.count_macs`) count for each. Returns
    ``{"HxW": {name: {"median_ms", "p90_ms", "fps", "gflops", "fraction_of_conv"}}}`` with a
    ``"conv3x3_64"`` entry holding the reference's ``median_ms`` and ``gflops``.
    """
    from ..vae import count_macs

    out: dict[str, dict[str, dict[str, float]]] = {}
    for height, width in sizes:
        x = torch.rand(1, vae.in_channels, height, width)
        conv, conv_flops = conv_reference(height, width)
        fns = {name: partial(fn, x) for name, fn in runners.items()}
        times = interleaved_timings({**fns, "conv3x3_64": conv}, repeats, warmup,
                                    desc=f"camera {height}x{width}")
        conv_s = float(np.median(times.pop("conv3x3_64")))
        conv_gflops = conv_flops / conv_s / 1e9
        flops = 2 * count_macs(vae, height, width, "both")
        row: dict[str, dict[str, float]] = {
            "conv3x3_64": {"median_ms": 1e3 * conv_s, "gflops": conv_gflops}}
        for name, seconds in times.items():
            stats = summarize_timings(seconds, 1)
            gflops = flops / (stats["median_ms"] / 1e3) / 1e9
            row[name] = {"median_ms": stats["median_ms"], "p90_ms": stats["p90_ms"],
                         "fps": stats["throughput_ips"], "gflops": gflops,
                         "fraction_of_conv": gflops / conv_gflops}
        out[f"{height}x{width}"] = row
    return out


def camera_lines(section: dict[str, dict[str, dict[str, float]]], threads: int) -> list[str]:
    """:func:`camera_speed`'s result as a Markdown table."""
    lines = [f"| frame | runtime ({threads} threads) | latency median | p90 | fps | GFLOP/s | "
             "of the 3x3 conv |", "|---|---|---|---|---|---|---|"]
    for size, row in section.items():
        conv = row["conv3x3_64"]
        for name, r in row.items():
            if name != "conv3x3_64":
                lines.append(f"| {size} | {name} | {r['median_ms']:.1f} ms | {r['p90_ms']:.1f} ms"
                             f" | {r['fps']:.2f} | {r['gflops']:.1f} | "
                             f"{100 * r['fraction_of_conv']:.0f}% |")
        lines.append(f"| {size} | 64-channel 3x3 conv, reference | {conv['median_ms']:.2f} ms | "
                     f"| | {conv['gflops']:.1f} | 100% |")
    return lines
