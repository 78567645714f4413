"""Apply a PEFT method to a model and print exact parameter statistics (see ``minipeft/modify.py``)."""

from minipeft.cli import run
from minipeft.modify import main

if __name__ == "__main__":
    raise SystemExit(run(main))
