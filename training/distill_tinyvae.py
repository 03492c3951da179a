#!/usr/bin/env python
"""Distil the TinyVAE from a teacher VAE (pre-training the teacher if needed).

    python training/distill_tinyvae.py --dataset photos --epochs 10
    python training/distill_tinyvae.py --dataset cifar10 --epochs 100 --download
    torchrun --nproc_per_node 2 training/distill_tinyvae.py --dataset photos --device cpu

A thin wrapper over :func:`hrm_vision.distill.cli.main`; ``--help`` lists every flag.
"""

import sys

from hrm_vision.distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
