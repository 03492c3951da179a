"""CPU latency and throughput of VAEs' encode, decode and both, measured interleaved."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

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
