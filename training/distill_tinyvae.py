#!/usr/bin/env python
"""Distil the TinyVAE from a teacher VAE (pre-training the teacher if needed).

    python training/distill_tinyvae.py --dataset photos --epochs 10
    python training/distill_tinyvae.py --dataset cifar10 --epochs 100 --download
    torchrun --nproc_per_node 2 training/distill_tinyvae.py --dataset photos --device cpu

A thin wrapper over :func:`hrm_vision.distill.__main__.main`; ``--help`` lists every flag. The
module is imported by :func:`hrm_vision.cli.run_module`, so a missing optional dependency is one
line naming the extra to install, like every other error the user can fix.
"""

import sys

from hrm_vision.cli import run_module

if __name__ == "__main__":
    sys.exit(run_module("distill_tinyvae", "hrm_vision.distill.__main__"))
