"""``python -m ornis``: the ``ornis`` command line, exiting with its return code."""

import sys

from ornis.cli.main import main

sys.exit(main())
