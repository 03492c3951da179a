#!/usr/bin/env python
"""Distil the TinyVAE from a teacher VAE (pre-training the teacher if needed).

    python training/distill_tinyvae.py --dataset photos --epochs 10
    python training/distill_tinyvae.py --dataset cifar10 --epochs 100 --download
    torchrun --nproc_per_node 2 training/distill_tinyvae.py --dataset photos --device cpu

The ``hrm-vision distill`` command (:func:`hrm_vision.train.command`); ``--help`` lists every
flag. An expected failure (a bad config or checkpoint, a missing extra) is one line.
"""

import sys

from hrm_vision.cli import run

if __name__ == "__main__":
    sys.exit(run("distill", sys.argv[1:], prog="distill_tinyvae.py"))
