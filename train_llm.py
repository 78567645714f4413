"""Fine-tune a causal LM with a PEFT method: ``python train_llm.py --help`` (see minipeft/training/cli.py)."""

import signal
import sys

# Ctrl-C or SIGTERM while the libraries load (several seconds) ends quietly too: 130 / 143, no traceback.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
try:
    from minipeft.cli import run
    from minipeft.training.cli import main
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

if __name__ == "__main__":
    raise SystemExit(run(main))
