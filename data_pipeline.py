"""Load, template, tokenize and batch instruction data, and show what the model will be trained on.

    python data_pipeline.py                                   # the built-in data set
    python data_pipeline.py --dataset_path ../shared/data/gpteacher_roleplay.json --num_samples 2

All flags: ``python data_pipeline.py --help``; the code is in ``minipeft/data/``.
"""

import os
import signal
import sys

# Ctrl-C or SIGTERM while the libraries load: nothing is written yet, so leave at once with 130 / 143.
for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, lambda signum, frame: (print("interrupted", file=sys.stderr), os._exit(128 + signum)))
from minipeft.cli import handle_signals_after_loading, run  # noqa: E402
from minipeft.cli.data import main  # noqa: E402

handle_signals_after_loading()

raise SystemExit(run(main, leaving=True))
