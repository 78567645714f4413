"""The examples run, offline, as a learner would run them (``python examples/NN_name.py``), and each one
asserts its own claims; here we check that they finish cleanly, print what they promise, and stay short."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("[0-9][0-9]_*.py"))
MAX_LINES = 80

# A line each example prints once its main claim has been asserted.
EXPECTED = {
    "01_lora_by_hand.py": "unmerge() restores W bit for bit",
    "02_train_prompt_tuning.py": "saved, reloaded onto a fresh base model: the same reply",
    "03_swap_adapters.py": "every row equals its adapter run alone",
    "04_merge_and_export.py": "merged model (transformers):",
}


def test_every_example_is_listed_and_short():
    assert [path.name for path in EXAMPLES] == sorted(EXPECTED)
    for path in EXAMPLES:
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) < MAX_LINES, f"{path.name}: {len(lines)} lines"
        assert f"python examples/{path.name}" in path.read_text(encoding="utf-8"), "the docstring says how to run it"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_runs_offline_and_asserts_its_claims(example, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1",  # tiny models: one thread is fastest on a shared machine
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{example.name} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    assert EXPECTED[example.name] in result.stdout
    assert list(tmp_path.iterdir()) == [], "an example left files behind in the working directory"
