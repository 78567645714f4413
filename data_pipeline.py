"""Load, template, tokenize and batch instruction data, and show what the model will be trained on.

    python data_pipeline.py                                   # the built-in data set
    python data_pipeline.py --dataset_path ../shared/data/gpteacher_roleplay.json --num_samples 2

All flags: ``python data_pipeline.py --help``; the code is in ``minipeft/data/``.
"""

from minipeft.cli import run
from minipeft.data.cli import main

raise SystemExit(run(main))
