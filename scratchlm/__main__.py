"""python -m scratchlm -> the `scratchlm` command."""

import sys

from .cli import main

sys.exit(main())
