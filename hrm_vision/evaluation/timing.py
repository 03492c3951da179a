"""CPU timing of several functions measured in turns, so machine noise hits them all alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from tqdm import tqdm


def interleaved_timings(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        desc: str = "timing") -> dict[str, list[float]]:
    """Seconds per call of each function in ``fns``, measured ``repeats`` times in turns.

    After ``warmup`` untimed rounds, every round calls each function once; the order rotates
    from round to round so no function always runs first (or right after a heavy one). On a
    shared, noisy machine this keeps ratios between the functions meaningful.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(repeats), desc=desc, leave=False):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summarize_timings(seconds: list[float], batch_size: int) -> dict[str, float]:
    """``median_ms`` and ``p90_ms`` per call, and ``throughput_ips`` (images/s at the median)."""
    if not seconds:
        raise ValueError("no timings to summarize")
    median = float(np.median(seconds))
    return {"median_ms": 1e3 * median, "p90_ms": 1e3 * float(np.percentile(seconds, 90)),
            "throughput_ips": batch_size / median}
