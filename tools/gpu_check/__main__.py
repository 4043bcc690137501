"""``python3 -m tools.gpu_check`` (``make gpu-check``), run from the repository root; see ``__init__.py``."""

import sys

from tools.gpu_check import main

sys.exit(main())
