"""python -m ptl_fused.engine [CONFIG] [overrides...] (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
