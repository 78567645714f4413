"""``python -m minipeft <command>``: see :mod:`minipeft.cli`.

(Python imports the ``minipeft`` package before this file runs; the command's own modules load inside
:func:`minipeft.cli.run`, where Ctrl-C is exit status 130.)
"""

import signal
import sys

from minipeft.cli import main

signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # cleanup runs, then exit 143
sys.exit(main())
