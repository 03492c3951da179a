"""8-bit latents of a compact student: what each way of spending the 256 levels costs.

    python experiments/latent_8bit.py [--checkpoint checkpoints/learn/alone/tinyvae_best.pth]

On the trust report's sets (the checkpoint's held-out crops and the unseen-source photograph,
512 each; 4,096 training crops for the statistics): PSNR lost against the float latents by
uniform codes on the training min/max range (``fit_range``), by equal-probability bins of a
Gaussian ``SPREAD`` training standard deviations wide for several spreads (``fit_spread``), and,
as a floor, uniform codes on each set's own range. Writes experiments/results/latent_8bit.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hrm_vision.codes import (
    fit_range,
    fit_spread,
    from_8bit,
    from_8bit_binned,
    to_8bit,
    to_8bit_binned,
)
from hrm_vision.metrics import psnr
from hrm_vision.trust import batched, crop_sets, load_student

OUT = Path(__file__).parent / "results" / "latent_8bit.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/learn/alone/tinyvae_best.pth")
    args = p.parse_args()
    torch.set_num_threads(2)
    with torch.no_grad():
        model, config = load_student(args.checkpoint)
        train, sets = crop_sets(config, model.image_size, 512, 4096)
        z = batched(model.encode, train)
        results: dict[str, dict[str, float]] = {}
        for key, x in sets.items():
            mu = model.encode(x)
            base = psnr(model.decode(mu), x)

            def cost(z_hat: torch.Tensor, x: torch.Tensor = x, base: float = base) -> float:
                return round(base - psnr(model.decode(z_hat), x), 4)

            low, step = fit_range(z)
            row = {"training min/max": cost(from_8bit(to_8bit(mu, low, step), low, step))}
            for spread in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0):
                c, s = fit_spread(z, spread)
                row[f"bins, spread {spread:g}"] = cost(from_8bit_binned(to_8bit_binned(mu, c, s),
                                                                        c, s))
            low, step = fit_range(mu)
            row["the set's own min/max"] = cost(from_8bit(to_8bit(mu, low, step), low, step))
            results[key] = row
            print(key, json.dumps(row))
    OUT.write_text(json.dumps({"checkpoint": args.checkpoint, "cost_db": results}, indent=1))


if __name__ == "__main__":
    main()
