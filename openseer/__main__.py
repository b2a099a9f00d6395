"""``python -m openseer`` (and ``torchrun -m openseer``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
