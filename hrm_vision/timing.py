"""Functions timed in rotating turns, so noise hits them alike; the machine they ran on."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm


def interleaved_timings(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        desc: str = "timing") -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, ``repeats`` rounds (each calls every function once,
    in a rotating order) after ``warmup`` untimed ones; ``ValueError`` for a bad count."""
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


def timings(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
            batch_size: int = 1, desc: str = "timing") -> dict[str, dict[str, float]]:
    """:func:`interleaved_timings` of ``fns``: per function ``median_ms`` and ``p90_ms`` per
    call, and ``throughput_ips`` (``batch_size`` images per second at the median)."""
    out = {}
    for name, seconds in interleaved_timings(fns, repeats, warmup, desc).items():
        median = float(np.median(seconds))
        out[name] = {"median_ms": 1e3 * median, "p90_ms": 1e3 * float(np.percentile(seconds, 90)),
                     "throughput_ips": batch_size / median}
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, logical CPU count, load average (other jobs on a shared machine), versions."""
    from ._version import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average_1_5_15min": load,
            "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "hrm_vision": __version__}
