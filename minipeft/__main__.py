"""``python -m minipeft <command>``: see :mod:`minipeft.cli`."""

import signal
import sys

signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # see train_llm.py
try:
    from minipeft.cli import main
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

sys.exit(main())
