"""Fine-tune a causal LM with a PEFT method: ``python train_llm.py --help`` (see minipeft/training/cli.py)."""

import os
import signal
import sys


def stop_while_loading(signum, frame):
    """Ctrl-C or SIGTERM while torch and transformers load (seconds): nothing is written yet, so leave at once
    with 130 / 143 (a KeyboardInterrupt here would surface as a library's ImportError and its traceback)."""
    print("interrupted", file=sys.stderr)
    os._exit(128 + signum)


signal.signal(signal.SIGINT, stop_while_loading)
signal.signal(signal.SIGTERM, stop_while_loading)
from minipeft.cli import run  # noqa: E402
from minipeft.training.cli import main  # noqa: E402

signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on: KeyboardInterrupt, exit 130
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # cleanup runs, then exit 143

if __name__ == "__main__":
    raise SystemExit(run(main))
