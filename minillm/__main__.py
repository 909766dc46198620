"""`python -m minillm` runs the command line (minillm/cli.py)."""
import sys

from minillm.cli import main

sys.exit(main())
