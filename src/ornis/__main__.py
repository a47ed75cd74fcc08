import sys

from ornis.cli.main import main

sys.exit(main())
