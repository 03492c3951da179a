"""``python -m hrm_vision.distill``: the distillation command line (see :mod:`.cli`)."""

import sys

from .cli import main

sys.exit(main())
