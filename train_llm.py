"""Fine-tune a causal LM with a PEFT method: ``python train_llm.py --help`` (see minipeft/training/cli.py)."""

from minipeft.cli import run
from minipeft.training.cli import main

if __name__ == "__main__":
    raise SystemExit(run(main))
