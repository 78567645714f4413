"""Fault injection, round two (issue #26): resume from any checkpoint moment, runs that fail say so, absurd
values refused before allocation, meaningless requests refused.

Each case asserts what the user sees (exit status, exactly one ``error:`` line naming the flag or file, no
traceback) and what is left on disk. Every case runs in this process through :func:`minipeft.cli.run`, as the
scripts do; the helpers come from ``tests/test_faults.py``.
"""

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_faults import GENERATE, TINY_RUN, builtin_model_available, digests, in_process, one_error, records, write_records

from minipeft.cli import run
from minipeft.cli.train import main as train_main
from minipeft.training import loop
from minipeft.training.signals import StopRequest

ROOT = Path(__file__).resolve().parents[1]
ALPACA_SAMPLE = ROOT / "examples" / "data" / "alpaca_sample.json"  # 32 records: 28 train + 4 val, 7 batches of 4

pytestmark = pytest.mark.skipif(not builtin_model_available(), reason="the built-in model is not built")


# -- 1. resume from any checkpoint moment ---------------------------------------------------------------------------
def stop_after(step: int):
    """A :class:`StopRequest` that asks to stop during optimizer step ``step``, as a Ctrl-C then would."""

    class StopAt(StopRequest):
        reads = 0

        @property
        def requested(self):
            StopAt.reads += 1
            if StopAt.reads == step:
                self.signal_number = signal.SIGINT
            return StopAt.reads == step

        @requested.setter
        def requested(self, value):
            pass

    return StopAt


def train_losses_and_adapter(output_dir: Path) -> tuple:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    losses = [(record["step"], record["loss"]) for record in map(json.loads, lines) if record["kind"] == "train"]
    return losses, load_file(output_dir / "adapter" / "adapter_model.safetensors")


# (records, val_size, batch_size, accumulation, max_steps, stop at): 7 batches an epoch, stopped at its end (one
# batch a step; windows of 2, the last one short); 7 batches and a window of 8 (one short step an epoch) with a
# validation split smaller than a batch. (Mid-epoch: tests/test_faults.py, SIGKILL then resume.)
RESUME_CASES = [(32, 4, 4, 1, 9, 7), (32, 4, 4, 2, 6, 4), (30, 2, 4, 8, 3, 1)]


@pytest.mark.parametrize("count, val_size, batch_size, accumulation, steps, stop_at", RESUME_CASES)
def test_a_run_stopped_at_any_checkpoint_resumes_to_the_uninterrupted_result(
        count, val_size, batch_size, accumulation, steps, stop_at, tmp_path, capsys, monkeypatch):
    data = write_records(tmp_path / "data.json", json.loads(ALPACA_SAMPLE.read_text())[:count])
    common = ["--dataset_path", data, "--val_size", val_size, "--batch_size", batch_size, "--save_every", "1",
              "--gradient_accumulation_steps", accumulation, "--max_steps", steps, "--lora_dropout", "0.1",
              "--precision", "fp32", "--eval_max_batches", "1", "--no_cache", "--num_threads", "1"]
    code, _, err = in_process(train_main, *common, "--output_dir", tmp_path / "whole", capsys=capsys)
    assert code == 0, err
    with monkeypatch.context() as patch:
        patch.setattr(loop, "StopRequest", stop_after(stop_at))
        code, out, err = in_process(train_main, *common, "--output_dir", tmp_path / "parts", capsys=capsys)
    assert code == 130 and f"interrupted at step {stop_at}/{steps}" in out, err
    code, out, err = in_process(train_main, *common, "--output_dir", tmp_path / "parts", "--resume", "latest",
                                capsys=capsys)
    assert code == 0 and "resumed from" in out, err
    (whole_losses, whole), (resumed_losses, resumed) = map(train_losses_and_adapter, (tmp_path / "whole",
                                                                                     tmp_path / "parts"))
    assert resumed_losses == whole_losses and len(whole_losses) == steps
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[key], resumed[key]) for key in whole)


# -- 2. runs that fail say so ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--learning_rate", "1e30", "the eval loss at step 2 is nan"),  # weights ~1e30, eval loss NaN
    ("--lora_alpha", "1e38", "no optimizer step was taken"),  # every step skipped (2 < --max_nonfinite_steps)
])
def test_a_run_that_trained_nothing_usable_fails_and_saves_no_adapter(flag, value, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = in_process(train_main, *TINY_RUN, "--output_dir", out, flag, value, capsys=capsys)
    one_error(code, err, "training failed:", message, "lower --learning_rate", "no adapter saved")
    assert "Trained" not in stdout
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    assert (out / "train_config.json").is_file()  # what the run was stays on record
    leftovers = [path for path in out.rglob("*") if ".tmp" in path.name or path.name.startswith(".tmp")]
    assert leftovers == []  # nothing half-written


def test_adapter_weights_beyond_any_trained_scale_are_a_failure():
    from minipeft.training.outcome import WEIGHT_BOUND, failure_message
    from minipeft.training.state import TrainState

    stepped = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    stepped.param_groups[0]["params"][0].grad = torch.ones(2)
    stepped.step()
    state = TrainState(step=3, eval_loss=1.5, eval_step=3)
    assert failure_message(state, stepped, {"a": torch.ones(2)}, "fp32") is None
    huge = failure_message(state, stepped, {"a": torch.full((2,), WEIGHT_BOUND * 10)}, "fp32")
    assert "adapter tensor a reaches 1e+07 at step 3" in huge and "--precision fp32" not in huge
    assert "adapter tensor a is not finite" in failure_message(state, stepped, {"a": torch.tensor([float("inf")])},
                                                               "bf16")
    never = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert "no optimizer step was taken" in failure_message(state, never, {"a": torch.ones(2)}, "fp32")


# -- 3. absurd values refused before allocation --------------------------------------------------------------------
@pytest.mark.parametrize("flags, fragments", [
    (["--lora_rank", "1000000000"], ["--lora_rank 1000000000 is larger than the target layers allow",
                                     "min(in, out) = 160"]),
    (["--modification_type", "prompt", "--num_virtual_tokens", "1000000"], ["--num_virtual_tokens 1000000",
                                                                             "at most 511 virtual tokens"]),
    (["--modification_type", "prefix", "--prefix_length", "1000000"], ["--prefix_length 1000000"]),
])
def test_sizes_beyond_the_model_or_the_machine_are_refused_before_allocating(flags, fragments, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = in_process(train_main, *TINY_RUN, "--output_dir", out, *flags, capsys=capsys)
    one_error(code, err, *fragments)
    assert not out.exists()  # a run that failed before writing anything leaves no folder


@pytest.mark.parametrize("flag, value, fragment", [("--seed", "-1", "give an integer from 0 to 4294967295"),
                                                   ("--seed", "18446744073709551616", "is not a seed"),
                                                   ("--num_threads", "100000", "CPU cores"),
                                                   ("--num_threads", "0", "CPU cores")])
def test_seeds_and_threads_out_of_range_are_usage_errors(flag, value, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(train_main, [*TINY_RUN, "--output_dir", str(tmp_path / "out"), flag, value])
    one_error(exit_info.value.code, capsys.readouterr().err, f"argument {flag}: {value}", fragment)
    assert not (tmp_path / "out").exists()


def test_a_rank_in_an_adapter_config_beyond_the_model_names_the_file(tmp_path, capsys):
    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / "adapter"
    code, _, err = in_process(modify_main, "--model", "builtin", "--save_adapter", adapter, capsys=capsys)
    assert code == 0, err
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "r": 1000000000}))
    before = digests(adapter)
    code, out, err = in_process(GENERATE, "--adapter", adapter, "--prompt", "Hi", "--max_new_tokens", "2",
                                capsys=capsys)
    one_error(code, err, f"{config_path}: r 1000000000 is larger than the target layers allow")
    assert "--lora_rank" not in err and out == "" and digests(adapter) == before



# -- 4. meaningless requests refused --------------------------------------------------------------------------------
@pytest.mark.parametrize("command, argv, fragment", [
    ("generate", ["--max_new_tokens", "0"], "--max_new_tokens 0: asks for no new token"),
    ("generate", ["--do_sample", "--top_k", "0"], "--top_k 0: keeps no token to sample from"),
    ("generate", ["--output_file", ""], "argument --output_file: an empty name"),
    ("modify", ["--save_adapter", ""], "argument --save_adapter: an empty name"),
    ("train", ["--output_dir", ""], "argument --output_dir: an empty name"),
    ("compare", ["--val_size", "0"], "argument --val_size: 0 asks for nothing"),
    ("compare", ["--output_dir", " "], "argument --output_dir: an empty name"),
    ("train", ["--cache_dir", "{file}"], "not a folder; give a folder name, or --no_cache"),
])
def test_meaningless_requests_are_refused(command, argv, fragment, tmp_path, capsys, monkeypatch):
    from minipeft.cli import main as cli_main

    monkeypatch.chdir(tmp_path)  # nothing may land in the current folder
    data = write_records(tmp_path / "data.json", records(20))
    before = digests(tmp_path)
    argv = [arg.format(file=data) for arg in argv]
    extra = {"generate": ["--model", "builtin", "--prompt", "Hi"], "modify": ["--model", "builtin"],
             "train": ["--max_steps", "2", "--num_threads", "1", "--dataset_path", str(data)], "compare": ["--dataset_path", str(data)]}
    try:
        code = cli_main([command, *extra[command], *argv])
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    out, err = capsys.readouterr()
    one_error(code, err, fragment)
    assert digests(tmp_path) == before and sorted(path.name for path in tmp_path.iterdir()) == ["data.json"]
