"""``python -m minipeft <command>``: see :mod:`minipeft.cli`.

As in the task scripts (``train_llm.py``): Ctrl-C or SIGTERM while the command's libraries load leaves at once
with 130 / 143 (nothing is written yet; an interrupt inside a half-imported torch or numpy would otherwise end
in their errors), and once they are loaded the command handles interrupts itself (:func:`minipeft.cli.run`).
(Python imports the ``minipeft`` package before this file runs; it loads nothing heavy.)
"""

import importlib
import os
import signal
import sys

for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, lambda signum, frame: (print("interrupted", file=sys.stderr), os._exit(128 + signum)))
from minipeft.cli import COMMANDS, handle_signals_after_loading, main  # noqa: E402

if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
    importlib.import_module(COMMANDS[sys.argv[1]][0])  # torch, transformers, ...: loaded while Ctrl-C leaves at once
handle_signals_after_loading()
sys.exit(main(leaving=True))
