"""``python -m efftheory ...``: the command line of :mod:`efftheory.cli`."""

import sys

from .cli import main

sys.exit(main())
