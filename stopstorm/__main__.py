"""`python -m stopstorm`: the `stopstorm` command (stopstorm/cli.py)."""

import sys

from stopstorm.cli import main

sys.exit(main())
