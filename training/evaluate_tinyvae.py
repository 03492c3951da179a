#!/usr/bin/env python
"""Evaluate the distilled TinyVAE against its teacher (size, speed, quality, latent alignment).

    python training/evaluate_tinyvae.py --checkpoint-dir checkpoints
    python training/evaluate_tinyvae.py --checkpoint-dir checkpoints --dataset cifar10

A thin wrapper over :func:`hrm_vision.evaluation.__main__.main` (``python -m
hrm_vision.evaluation``); ``--help`` lists every flag.
"""

import sys

from hrm_vision.evaluation.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
