"""``python -m evomerge.cli``: the ``evomerge`` command without the console script (tests, Ray Jobs)."""

import sys

from evomerge.cli import main

sys.exit(main())
