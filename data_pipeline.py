"""Load, template, tokenize and batch instruction data, and show what the model will be trained on.

    python data_pipeline.py                                   # the built-in data set
    python data_pipeline.py --dataset_path ../shared/data/gpteacher_roleplay.json --num_samples 2

All flags: ``python data_pipeline.py --help``; the code is in ``minipeft/data/``.
"""

import signal
import sys

# Ctrl-C or SIGTERM while the libraries load (several seconds) ends quietly too: 130 / 143, no traceback.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
try:
    from minipeft.cli import run
    from minipeft.data.cli import main
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(run(main))
