"""``python -m openseer`` (and ``torchrun -m openseer``) runs the command line."""

import sys

from .commands import main

sys.exit(main())
