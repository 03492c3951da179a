"""``python -m hrm_vision`` is the ``hrm-vision`` command (see :mod:`hrm_vision.cli`)."""

import sys

from .cli import main

sys.exit(main())
