"""Apply a PEFT method to a model and print exact parameter statistics (see ``minipeft/modify.py``)."""

import signal
import sys

# Ctrl-C or SIGTERM while the libraries load (several seconds) ends quietly too: 130 / 143, no traceback.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
try:
    from minipeft.cli import run
    from minipeft.modify import main
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

if __name__ == "__main__":
    raise SystemExit(run(main))
