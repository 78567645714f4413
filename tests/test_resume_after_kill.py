"""Resume after SIGKILL at any moment, over data sizes: a property test (issue #26).

Each case is drawn from a seeded generator: how many records, the validation split (smaller than a batch
included), the batch size, the accumulation window, the number of steps (one epoch or several; short last
windows), and the moment of the kill (after ``k`` logged steps; the kill may land in a step, in a checkpoint
being written, or at an epoch's end). The killed run is resumed with ``--resume latest`` and must end exactly
as an uninterrupted run does: every step's loss once, and the adapter, bitwise (fp32, dropout 0.1).

``MINIPEFT_KILL_CASES=N`` draws more cases (``MINIPEFT_KILL_SEED`` another draw); CI runs the default few.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_faults import builtin_model_available, in_process, script, script_env, write_records

from minipeft.cli.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
ALPACA_SAMPLE = ROOT / "examples" / "data" / "alpaca_sample.json"  # 32 records

pytestmark = pytest.mark.skipif(not builtin_model_available(), reason="the built-in model is not built")


def draw_cases(count: int, seed: int) -> list:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        records, val_size = rng.randint(8, 32), rng.choice([1, 2, 4])
        batch_size, accumulation = rng.choice([2, 4, 8]), rng.choice([1, 2, 3])
        batches = -(-(records - val_size) // batch_size)
        steps_per_epoch = -(-batches // accumulation)
        steps = rng.randint(steps_per_epoch + 2, 2 * steps_per_epoch + 3)
        cases.append((records, val_size, batch_size, accumulation, steps, rng.randint(1, steps - 2)))
    return cases


CASES = draw_cases(int(os.environ.get("MINIPEFT_KILL_CASES", "2")), int(os.environ.get("MINIPEFT_KILL_SEED", "26")))


def train_losses(output_dir: Path) -> list:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines) if record["kind"] == "train"]


@pytest.mark.parametrize("records, val_size, batch_size, accumulation, steps, kill_after", CASES)
def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_result(
        records, val_size, batch_size, accumulation, steps, kill_after, tmp_path, capsys):
    data = write_records(tmp_path / "data.json", json.loads(ALPACA_SAMPLE.read_text())[:records])
    common = ["--dataset_path", data, "--val_size", val_size, "--batch_size", batch_size, "--save_every", "1",
              "--gradient_accumulation_steps", accumulation, "--max_steps", steps, "--lora_dropout", "0.1",
              "--precision", "fp32", "--eval_max_batches", "1", "--eval_every", "3", "--log_every", "1",
              "--no_cache", "--num_threads", "1"]
    code, _, err = in_process(train_main, *common, "--output_dir", tmp_path / "whole", capsys=capsys)
    assert code == 0, err

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "train_llm.py"), *map(str, common), "--output_dir",
                                str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=script_env())
    deadline = time.monotonic() + 180
    while not ((killed / "metrics.jsonl").is_file() and len(train_losses(killed)) >= kill_after):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # no handler, no cleanup: maybe inside a step or a checkpoint's write
    process.wait()
    if (killed / "adapter").exists():
        pytest.fail("the run finished before the kill landed: draw a later step count")
    resumed = script("train_llm.py", *common, "--output_dir", killed, "--resume", "latest", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    assert train_losses(killed) == train_losses(tmp_path / "whole") and len(train_losses(killed)) == steps
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    again = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[key], again[key]) for key in whole)


def test_the_draw_covers_what_the_property_is_about():
    """The default draw includes a validation split smaller than a batch, windows longer than one batch and
    runs of more than one epoch, so the cases above are not all the easy one."""
    assert any(val_size < batch_size for _, val_size, batch_size, *_ in CASES)
    assert any(accumulation > 1 for *_, accumulation, _, _ in CASES)
    assert all(steps >= 3 and 1 <= kill_after <= steps - 2 for *_, steps, kill_after in CASES)
