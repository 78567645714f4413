"""``python -m minipeft <command>``: see :mod:`minipeft.cli`."""

import sys

from minipeft.cli import main

sys.exit(main())
