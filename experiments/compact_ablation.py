"""The compact student's residual design against alternatives, same loop, data and steps.

    python experiments/compact_ablation.py --steps 600 --json runs/compact/ablation.json

Variants (all :class:`~hrm_vision.compact.CompactStudentVAE` with the defaults, trained by
``compact_train.train``: sigma-VAE likelihood + KL with free bits on the total rate):

* ``pca``: the design, the linear path fitted to the PCA of training crops (starts at PCA-64);
* ``dct``: the linear path left at its data-free DCT start;
* ``nolinear``: no linear path (basis zeroed): the nonlinear branches alone, ends zero-started;
* ``plain``: a plain convolutional encoder/decoder from scratch: no linear path and the branch
  ends at PyTorch's default random initialisation instead of zero.

Prints decode(mu) PSNR on the held-out and unseen-source crops after each variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import compact_train  # puts training/ on the path, for training/compact.py
import torch
from compact import compact_table, markdown_table

from hrm_vision.compact import CompactStudentVAE

VARIANTS = ("pca", "dct", "nolinear", "plain")


def build(variant: str, train_images: torch.Tensor) -> CompactStudentVAE:
    model = CompactStudentVAE()
    compact_train.prepare(model, train_images, "nolinear" if variant == "plain" else variant)
    if variant == "plain":
        for layer in (model.encoder.head, model.decoder.stages[-2]):
            layer.reset_parameters()
    return model


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-time cap per variant")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--free-bits", type=float, default=4.0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data, evals = compact_train.load_data(8192)
    results: dict[str, object] = {"args": vars(args),
                                  "baselines": compact_table([], evals, data)}
    print(markdown_table(results["baselines"]), flush=True)  # type: ignore[arg-type]
    for variant in args.variants:
        torch.manual_seed(0)
        model = build(variant, data)
        run = compact_train.train(model, data, evals, args.steps, args.lr, 64, args.free_bits,
                                  0.99, args.minutes, args.eval_every)
        results[variant] = run
        print(json.dumps({"variant": variant, "steps_done": run["steps_done"], **run["final"]}),
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
