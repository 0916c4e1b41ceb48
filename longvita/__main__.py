"""`python -m longvita ...` is the `longvita` command."""

import sys

from longvita.cli import main

sys.exit(main())
