#!/usr/bin/env python
"""Evaluate the distilled TinyVAE against its teacher (size, speed, quality, latent alignment).

    python training/evaluate_tinyvae.py --checkpoint-dir checkpoints
    python training/evaluate_tinyvae.py --checkpoint-dir checkpoints --dataset cifar10

A thin wrapper over :func:`hrm_vision.evaluate.main`; ``--help`` lists every flag.
"""

from hrm_vision.evaluate import main

if __name__ == "__main__":
    main()
