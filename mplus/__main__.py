"""``python -m mplus``: the ``mplus`` command line (:mod:`mplus.cli`)."""

import sys

from .cli import main

sys.exit(main())
