#!/usr/bin/env python
"""Quick self-check of the distillation stack (< 1 minute on CPU, no download):
models instantiate, each loss term is finite, one training step changes student and adapter.

    python training/test_distillation.py
"""

import sys

from hrm_vision.evaluation.selfcheck import main

if __name__ == "__main__":
    sys.exit(main())
