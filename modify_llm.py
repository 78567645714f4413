"""Apply a PEFT method to a model and print exact parameter statistics (see ``minipeft/cli/modify.py``)."""

import os
import signal
import sys

# Ctrl-C or SIGTERM while the libraries load: nothing is written yet, so leave at once with 130 / 143.
for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, lambda signum, frame: (print("interrupted", file=sys.stderr), os._exit(128 + signum)))
from minipeft.cli import handle_signals_after_loading, run  # noqa: E402
from minipeft.cli.modify import main  # noqa: E402

handle_signals_after_loading()

if __name__ == "__main__":
    raise SystemExit(run(main, leaving=True))
