"""``python -m vxpu``: the command-line interface."""

import sys

from vxpu.cli import main

sys.exit(main())
