#!/usr/bin/env python
"""Evaluate the distilled TinyVAE against its teacher (size, speed, quality, latent alignment).

    python training/evaluate_tinyvae.py --checkpoint-dir checkpoints
    python training/evaluate_tinyvae.py --checkpoint-dir checkpoints --dataset cifar10

The same as ``hrm-vision evaluate`` (:mod:`hrm_vision.evaluate`); ``--help`` lists every flag.
"""

import sys

from hrm_vision.cli import run

if __name__ == "__main__":
    sys.exit(run("evaluate", sys.argv[1:], prog="evaluate_tinyvae.py"))
