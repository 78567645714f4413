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
from minipeft.core.errors import UserError
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
    ("generate", ["--max_new_tokens", "-1"], "--max_new_tokens -1: asks for no new token"),
    ("generate", ["--do_sample", "--top_k", "0"], "--top_k 0: keeps no token to sample from"),
    ("generate", ["--output_file", ""], "argument --output_file: an empty name"),
    ("generate", ["--output_file", "newdir/"], "argument --output_file: 'newdir/' ends in '/', a folder"),
    ("compare", ["--report", "newdir/"], "argument --report: 'newdir/' ends in '/', a folder"),
    ("builtin-data", ["newdir/"], "argument path: 'newdir/' ends in '/', a folder"),  # wrote a file named newdir
    ("generate", ["--do_sample", "--temperature", "0"], "--temperature must be positive when sampling"),
    ("generate", ["--do_sample", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
    ("generate", ["--batch_size", "0"], "--batch_size must be a positive integer, got 0"),
    ("generate", ["--prompt", " "], "--prompt: empty"),
    ("data", ["--dataset_path", ""], "--dataset_path '': an empty name"),  # read as ".", called a directory
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
             "train": ["--max_steps", "2", "--num_threads", "1", "--dataset_path", str(data)], "compare": ["--dataset_path", str(data)], "data": ["--no_cache"],
             "builtin-data": []}
    try:
        code = cli_main([command, *extra[command], *argv])
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    out, err = capsys.readouterr()
    one_error(code, err, fragment)
    assert "model:" not in err  # refused before loading: nothing printed before the error line (round four)
    assert digests(tmp_path) == before and sorted(path.name for path in tmp_path.iterdir()) == ["data.json"]


# -- 5. a resume continues this run, from a checkpoint that says so -------------------------------------------------
@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory) -> tuple:
    """A finished two-step run on a data file of its own, with a checkpoint at each step: ``(run dir, data)``."""
    root = tmp_path_factory.mktemp("resume")
    data = write_records(root / "data.json", records(20))
    code = run(train_main, [*TINY_RUN, "--save_every", "1", "--dataset_path", str(data),
                            "--output_dir", str(root / "run")])
    assert code == 0
    return root / "run", data


def resume_copy(checkpointed_run, tmp_path, capsys, *flags) -> tuple:
    """``(copy, resume)``: a private copy of the run, and a function that runs ``--resume latest`` on it (with
    ``flags``) and returns ``(exit status, stdout, stderr)``."""
    import shutil

    copy = Path(shutil.copytree(checkpointed_run[0], tmp_path / "run"))
    return copy, lambda: in_process(train_main, "--output_dir", copy, "--resume", "latest", "--max_steps", "3",
                                    "--num_threads", "1", *flags, capsys=capsys)


def edit_json(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))  # NaN is written as NaN, as a hand edit or a foreign writer would


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s["trainer"].update(step=-5), '"step" must be an integer from 0 to'),
    (lambda s: s["trainer"].update(step=1e20), '"step" must be an integer from 0 to'),
    (lambda s: s["trainer"].update(step=10**20), '"step" must be an integer from 0 to'),
    (lambda s: s["trainer"].update(step="2"), '"step" must be an integer'),
    (lambda s: s["trainer"].update(best_eval_loss=float("nan")), '"best_eval_loss" must be a finite number'),
    (lambda s: s["trainer"].update(train_seconds=float("inf")), '"train_seconds" must be a finite number'),
    (lambda s: s["trainer"].update(gradient_check_done="yes"), '"gradient_check_done" must be true or false'),
    (lambda s: s["trainer"].update(best_step=99), '"best_step" must be at most "step" (2)'),
    (lambda s: s["trainer"].update(learning="fast"), 'unknown field "learning"'),
    (lambda s: s["trainer"].pop("step"), '"trainer" has no "step"'),
    (lambda s: s.update(trainer=[1, 2]), '"trainer" must be an object'),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan")), '"optimizer.param_groups[0].lr" must be'),
    (lambda s: s["optimizer"]["param_groups"][0].update(betas=[0.9, 5]), '"optimizer.param_groups[0].betas"'),
    (lambda s: s["optimizer"].update(parameter_names=5), '"optimizer.parameter_names" must be'),
    (lambda s: s.update(rng="none"), '"rng" must be'),
])
def test_a_damaged_trainer_state_is_refused_naming_the_field(change, fragment, checkpointed_run, tmp_path, capsys):
    copy, resume = resume_copy(checkpointed_run, tmp_path, capsys)
    state_path = copy / "checkpoints" / "step-2" / "trainer_state.json"
    edit_json(state_path, change)
    before = digests(copy, checkpointed_run[1])
    code, out, err = resume()
    one_error(code, err, f"{state_path}: ", fragment)
    assert digests(copy, checkpointed_run[1]) == before and "resumed from" not in out


def edit_tensors(path: Path, change) -> None:
    from safetensors.torch import save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def nan_moment(tensors: dict) -> None:
    key = min(key for key in tensors if key.endswith("exp_avg"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")


def nan_weight(tensors: dict) -> None:
    key = min(tensors)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")


@pytest.mark.parametrize("file, change, fragment", [
    ("adapter/adapter_model.safetensors", nan_weight, "holds NaN or infinity (minipeft saves finite checkpoints"),
    ("optimizer.safetensors", nan_moment, "exp_avg holds NaN or infinity"),
    ("optimizer.safetensors", lambda tensors: tensors.update(extra=torch.zeros(1)),
     "tensor 'extra' is not an optimizer"),
    ("rng_state.safetensors", lambda tensors: tensors.update({"rank0.numpy": torch.zeros(3, dtype=torch.int64)}),
     "tensor rank0.numpy is not a numpy generator state (624 values of int64)"),
    ("rng_state.safetensors", lambda tensors: tensors.update({"rank0.torch_cpu": torch.zeros(7)}),
     "tensor rank0.torch_cpu is not a torch_cpu generator state"),
])
def test_damaged_optimizer_or_random_state_tensors_are_refused(file, change, fragment, checkpointed_run, tmp_path,
                                                               capsys):
    copy, resume = resume_copy(checkpointed_run, tmp_path, capsys)
    path = copy / "checkpoints" / "step-2" / file
    edit_tensors(path, change)
    before = digests(copy)
    code, out, err = resume()
    one_error(code, err, f"{path}: ", fragment)
    assert digests(copy) == before and "resumed from" not in out


def test_optimizer_groups_that_do_not_fit_are_refused(checkpointed_run, tmp_path, capsys):
    copy, resume = resume_copy(checkpointed_run, tmp_path, capsys)
    edit_json(copy / "checkpoints" / "step-2" / "trainer_state.json",
              lambda state: state["optimizer"]["param_groups"][0].update(params=[0]))
    before = digests(copy)
    code, _, err = resume()
    one_error(code, err, f"{copy / 'checkpoints' / 'step-2' / 'trainer_state.json'}: \"optimizer.param_groups\" "
              "must be groups holding each of the 8 parameters once (indices 0 to 7), got [0]")
    assert digests(copy) == before


def test_lines_of_metrics_jsonl_that_are_not_records_are_dropped_on_resume(checkpointed_run, tmp_path, capsys):
    copy, resume = resume_copy(checkpointed_run, tmp_path, capsys)
    metrics = copy / "metrics.jsonl"
    kept = metrics.read_text()
    metrics.write_text(kept + "[" * 10_000 + "]" * 10_000 + "\n5\n" + '{"kind": "train"}\n' + '{"step": "2"}\n')
    code, out, err = resume()
    assert code == 0 and "resumed from" in out, err
    lines = metrics.read_text().splitlines()
    assert "\n".join(lines[:len(kept.splitlines())]) + "\n" == kept  # the curve up to the checkpoint, as it was
    assert all(isinstance(json.loads(line)["step"], int) for line in lines)


def test_a_method_setting_other_than_the_checkpoints_is_refused(checkpointed_run, tmp_path, capsys):
    copy, resume = resume_copy(checkpointed_run, tmp_path, capsys, "--lora_alpha", "3")
    before = digests(copy)
    code, _, err = resume()
    one_error(code, err, "the adapter was trained with lora_alpha = 16", "this run builds 3 (set by --lora_alpha)",
              "resume with the run's own method settings")
    assert digests(copy) == before


def test_a_method_setting_of_another_type_in_the_checkpoint_is_named_as_the_files(checkpointed_run, tmp_path,
                                                                                   capsys):
    """``"r": "8"`` in a checkpoint's adapter config read as another rank "(--lora_rank)", a flag not given (round
    six): the file's fields are checked by type first, naming the file and the field."""
    copy, resume = resume_copy(checkpointed_run, tmp_path, capsys)
    config = copy / "checkpoints" / "step-2" / "adapter" / "adapter_config.json"
    edit_json(config, lambda values: values.update(r=str(values["r"])))
    before = digests(copy)
    code, _, err = resume()
    one_error(code, err, f'{config}: "r" must be a positive integer, got \'8\'')
    assert "--lora_rank" not in err and digests(copy) == before


def test_a_data_file_changed_since_the_checkpoint_is_refused(checkpointed_run, tmp_path, capsys):
    copy, resume = resume_copy(checkpointed_run, tmp_path, capsys)
    data = checkpointed_run[1]
    original = data.read_bytes()
    try:
        write_records(data, records(21))  # one record more: every batch after the first moves
        before = digests(copy, data)
        code, _, err = resume()
        one_error(code, err, f"--dataset_path {data} changed since the run started", "--resume_new_data")
        assert digests(copy, data) == before
    finally:
        data.write_bytes(original)


def test_another_data_set_or_setting_is_refused_unless_new_data_is_asked_for(checkpointed_run, tmp_path):
    from minipeft.training.resume_checks import check_same_data, check_same_settings, data_fingerprint

    checkpoint = checkpointed_run[0] / "checkpoints" / "step-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["data"]
    config = json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())
    metadata = {**config["minipeft"], "base_model_name_or_path": config["base_model_name_or_path"]}
    assert data_fingerprint(metadata) == saved  # what the run records is what the run's metadata gives
    check_same_data(checkpoint, saved, data_fingerprint(metadata))
    other = write_records(tmp_path / "other.json", records(20, start=5))
    moved = {**metadata, "training": {**metadata["training"], "dataset_path": str(other)}}
    with pytest.raises(UserError, match=f"--dataset_path {other} \\(the run started with"):
        check_same_data(checkpoint, saved, data_fingerprint(moved))
    check_same_data(checkpoint, saved, data_fingerprint(moved), new_data=True)  # asked for: goes on
    rebatched = {**metadata, "training": {**metadata["training"], "batch_size": 4}}
    with pytest.raises(UserError, match="--batch_size 4 \\(the run started with 8\\)"):
        check_same_data(checkpoint, saved, data_fingerprint(rebatched))
    faster = {**metadata, "training": {**metadata["training"], "learning_rate": 1.0}}
    with pytest.raises(UserError, match="--learning_rate 1.0 changes what the run computes"):
        check_same_settings(checkpoint, config, faster)
    check_same_settings(checkpoint, config, metadata)  # the run's own settings: nothing to say
    with pytest.raises(UserError, match="the run trained on --model builtin, this run loads gpt2; resume with the run's own --model"):
        check_same_settings(checkpoint, config, {**metadata, "base_model_name_or_path": "gpt2"})


# -- 6. every JSON parse bounded; adapter configs checked field by field --------------------------------------------
@pytest.mark.parametrize("text, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),
    ('[{"instruction": "a", "input": "", "output": "b", "score": 1e400}]', "the number 1e400 is beyond"),
    ('[{"instruction": "a", "input": "", "output": "b", "id": ' + "9" * 5000 + "}]", "has more than 64 digits"),
])
def test_data_files_beyond_the_json_bounds_are_refused(text, fragment, tmp_path, capsys):
    from minipeft.cli.data import main as data_main

    data = tmp_path / "data.json"
    data.write_text(text)
    before = digests(tmp_path)
    code, _, err = in_process(data_main, "--dataset_path", data, "--no_cache", capsys=capsys)
    one_error(code, err, f"{data}: not valid JSON", fragment)
    assert digests(tmp_path) == before


def test_a_prompts_file_nested_too_deeply_is_refused(tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text("[" * 50_000 + "]" * 50_000)
    code, out, err = in_process(GENERATE, "--model", "builtin", "--prompts_file", prompts, capsys=capsys)
    one_error(code, err, f"--prompts_file {prompts}", "nested deeper than 64 levels")
    assert out == ""


@pytest.mark.parametrize("field, value, fragment", [
    ("target_modules", 5, '"target_modules" must be a module name, a regular expression or a list of module names'),
    ("target_modules", [1, 2], '"target_modules" must be a module name'),
    ("r", 1e9, '"r" must be a positive integer, got 1000000000.0'),
    ("fan_in_fan_out", "yes", '"fan_in_fan_out" must be true or false'),
    ("layers_to_transform", "all", '"layers_to_transform" must be an integer or a list of integers'),
    ("lora_alpha", "x" * 1000, '"lora_alpha" must be a finite number'),
    ("modules_to_save", {"a": 1}, '"modules_to_save" must be a module name'),
])
def test_an_adapter_config_field_of_the_wrong_type_names_the_file_and_field(field, value, fragment, tmp_path,
                                                                             capsys):
    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / "adapter"
    code, _, err = in_process(modify_main, "--model", "builtin", "--save_adapter", adapter, capsys=capsys)
    assert code == 0, err
    config_path = adapter / "adapter_config.json"
    edit_json(config_path, lambda config: config.update({field: value}))
    before = digests(adapter)
    code, out, err = in_process(GENERATE, "--adapter", adapter, "--prompt", "Hi", "--max_new_tokens", "2",
                                capsys=capsys)
    one_error(code, err, f"{config_path}: {fragment}")
    assert "--lora" not in err and out == "" and digests(adapter) == before


def test_an_adapter_config_nested_too_deeply_names_the_file(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * 10_000 + "]" * 10_000 + "}")
    code, _, err = in_process(GENERATE, "--adapter", adapter, "--prompt", "Hi", capsys=capsys)
    one_error(code, err, f"{adapter / 'adapter_config.json'}: not valid JSON", "nested deeper than 64 levels")


# -- 7. more meaningless requests -----------------------------------------------------------------------------------
def test_a_prefix_hidden_size_without_the_projection_is_refused(tmp_path, capsys):
    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / "adapter"
    code, out, err = in_process(modify_main, "--model", "builtin", "--modification_type", "prefix",
                                "--prefix_hidden_size", "64", "--save_adapter", adapter, capsys=capsys)
    one_error(code, err, "--prefix_hidden_size sizes the MLP of --prefix_projection, which is off")
    assert not adapter.exists()
    code, _, err = in_process(modify_main, "--model", "builtin", "--modification_type", "prefix",
                              "--prefix_projection", "--prefix_hidden_size", "64", "--save_adapter", adapter,
                              capsys=capsys)
    assert code == 0, err  # with the MLP it sizes, the same flag is fine


def test_a_100_mb_record_is_refused_before_tokenizing(tmp_path, capsys):
    from minipeft.cli.data import main as data_main

    rows = records(5)
    rows[3]["output"] = "x" * 100_000_000
    data = write_records(tmp_path / "data.json", rows)
    before = digests(tmp_path)
    code, _, err = in_process(data_main, "--dataset_path", data, "--no_cache", "--max_length", "128", capsys=capsys)
    one_error(code, err, f"{data}: record 3 has 100,000,0", "raise --max_length",
              "more than --max_length 128 tokens can hold (8,192 = 128 × 64)")
    assert digests(tmp_path) == before


# -- 8. a model directory checked before it is used -----------------------------------------------------------------
def model_copy(tmp_path: Path, change) -> Path:
    """A copy of the built-in model's directory (config.json, model.safetensors, tokenizer) after ``change``."""
    import shutil

    from minipeft.builtin import MODEL_DIR

    directory = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    change(directory)
    return directory


def config_edit(**values):
    return lambda directory: edit_json(directory / "config.json", lambda config: config.update(values))


def one_weight_nan(directory: Path) -> None:
    from safetensors.torch import save_file

    tensors = load_file(directory / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"] = tensors["transformer.h.1.mlp.c_fc.weight"].clone()
    tensors["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def cut_in_half(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])


def header_shape_lies(directory: Path) -> None:
    """The header of model.safetensors says [1, 2] for the first tensor, whose bytes are many more."""
    import struct

    weights = directory / "model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header[min(key for key in header if key != "__metadata__")]["shape"] = [1, 2]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)  # no longer: padded to the length
    weights.write_bytes(raw[:8] + text + raw[8 + length:])


def tokenizer_needing_tiktoken(directory: Path) -> None:
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    (directory / "tokenizer.model").write_bytes(b"neither sentencepiece nor tiktoken")


@pytest.mark.parametrize("change, where, fragments", [
    (config_edit(layer_norm_epsilon=float("nan")), "config.json", ['"layer_norm_epsilon" must be a finite number']),
    (config_edit(n_embd=-5), "config.json", ['"n_embd" must be a whole number ≥ 1, got -5']),
    (config_edit(n_head=0), "config.json", ['"n_head" must be a whole number ≥ 1, got 0']),
    (config_edit(vocab_size="big"), "config.json", ['"vocab_size" must be a whole number ≥ 1']),
    (config_edit(resid_pdrop=3), "config.json", ['"resid_pdrop" must be a number in [0, 1]']),
    (config_edit(n_embd=10_000_000, n_layer=1000), "config.json", ["describes a model of", "GB of memory available",
                                                                   "n_embd 10,000,000"]),
    (config_edit(n_layer=1_000_000_000), "config.json", ["describes a model of at least", "n_layer 1,000,000,000"]),
    (config_edit(model_type="llama", vocab_size=10_000_000), "config.json", [  # round six: GPT-2's sizes quoted
        "describes a model of", "vocab_size 10,000,000, hidden_size 4,096", "num_hidden_layers 32",
        "n_embd, n_head, n_layer, n_positions in it are not read by a llama model (\"model_type\"), which takes"]),
    (config_edit(model_type="no_such_architecture"), "config.json", ["no_such_architecture"]),
    (config_edit(n_layer=2), "", [  # round eight: the model ran without blocks 2 and 3, exit 0
        "the weights hold block 3 (transformer.h.3.", "but config.json describes 2 layers"]),
    (config_edit(vocab_size=100), "model.safetensors", [  # round seven: "--model: tensor ..." named no folder
        "has shape [3063, 160] in the weights, but config.json describes [100, 160]"]),
    (lambda directory: (directory / "config.json").write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}"),
     "config.json", ["not valid JSON", "nested deeper than 64 levels"]),
    (config_edit(quantization_config="gptq"), "", ["config.json has a quantization_config (gptq)"]),
    (one_weight_nan, "model.safetensors", ["tensor transformer.h.1.mlp.c_fc.weight: holds NaN or infinity"]),
    (cut_in_half, "model.safetensors", ["ends inside tensor", "the file is truncated"]),
    (header_shape_lies, "model.safetensors", ["its header gives", "bytes for shape [1, 2]", "the file is damaged"]),
    (tokenizer_needing_tiktoken, "", ["the tokenizer (tokenizer_config.json, tokenizer.model) does not load"]),
    (lambda directory: (directory / "tokenizer_config.json").write_text("[1, 2]"), "tokenizer_config.json",
     ["holds a JSON array, not the object a tokenizer file is"]),  # was blamed on tokenizer.json (round four)
])
def test_a_model_directory_that_cannot_work_is_refused_naming_the_file(change, where, fragments, tmp_path, capsys):
    model = model_copy(tmp_path, change)
    before = digests(tmp_path)
    code, out, err = in_process(GENERATE, "--model", model, "--prompt", "Hi", "--max_new_tokens", "2", capsys=capsys)
    one_error(code, err, f"--model {model / where}: ", *fragments)
    assert out == "" and digests(tmp_path) == before


def test_an_intact_model_directory_passes_the_checks(tmp_path, capsys):
    model = model_copy(tmp_path, lambda directory: None)
    code, out, err = in_process(GENERATE, "--model", model, "--prompt", "Hi", "--max_new_tokens", "2", capsys=capsys)
    assert code == 0 and "error" not in err, err


# -- 9. interrupts ---------------------------------------------------------------------------------------------------
def test_sigterm_during_compare_keeps_the_finished_methods_and_exits_143(tmp_path):
    import subprocess
    import sys
    import time

    from test_faults import ROOT as REPOSITORY, script_env

    out = tmp_path / "compare"
    process = subprocess.Popen(
        [sys.executable, "-m", "minipeft", "compare", "--methods", "lora,ia3", "--max_steps", "60",
         "--batch_size", "4", "--max_records", "64", "--generation_prompts", "0", "--speed_tokens", "2",
         "--eval_max_batches", "1", "--output_dir", str(out)],
        cwd=REPOSITORY, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        second = out / "ia3" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (second.is_file() and '"train"' in second.read_text()):  # ia3 is training: lora is finished
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        finished = digests(out / "comparison.json", out / "comparison.md", out / "lora" / "adapter")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in err, err
    assert [row["method"] for row in json.loads((out / "comparison.json").read_text())["rows"]] == ["lora"]
    assert digests(out / "comparison.json", out / "comparison.md", out / "lora" / "adapter") == finished
    assert process.returncode == 143, err


@pytest.mark.parametrize("where", [None, 0, 9, 10, 99])  # nowhere, first, across a chunk's edge, last
def test_the_chunked_finiteness_check_finds_what_the_whole_one_does(where):
    from minipeft.loading.checks import all_finite

    tensor = torch.randn(10, 10, dtype=torch.bfloat16)
    if where is not None:
        tensor.view(-1)[where] = float("nan") if where % 2 else float("inf")
    assert all_finite(tensor, chunk=10) == bool(torch.isfinite(tensor).all()) == (where is None)


def test_a_max_length_beyond_the_models_positions_is_cut_to_them_and_said(tmp_path, capsys):
    """The built-in model has 512 positions; a longer --max_length ended in an IndexError inside the embedding
    once a record was that long. Now records are cut at 512, and a note says so."""
    records = json.loads(ALPACA_SAMPLE.read_text())[:12]
    records[0]["output"] = " ".join(["word"] * 1500)
    data = write_records(tmp_path / "long.json", records)
    code, out, err = in_process(train_main, *TINY_RUN, "--dataset_path", data, "--val_size", "2",
                                "--output_dir", tmp_path / "out", "--max_length", "100000", capsys=capsys)
    assert code == 0, err
    assert "note: --max_length 100000 is more than the model's 512 positions (its config's n_positions)" in out
    config = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert config["data"]["max_length"] == 512


@pytest.mark.parametrize("field, value, extra, fragment", [
    ("step", 99_999_999_999, [], '"step" is 99999999999, but its folder is step 2'),  # (round three)
    ("epoch", 10 ** 12, [], "trainer_state.json is not the file minipeft wrote there"),  # (its sha256; round ten)
    (None, None, ["--max_steps", "1"], "is at step 2, past this run's last step (1"),
])
def test_a_checkpoint_past_the_runs_end_or_with_impossible_counts_is_refused(field, value, extra, fragment,
                                                                             checkpointed_run, tmp_path, capsys):
    """It exited 0 with "Trained 99999999999 steps" having trained nothing, or took epoch 1e12."""
    copy, _ = resume_copy(checkpointed_run, tmp_path, capsys)
    state_file = copy / "checkpoints" / "step-2" / "trainer_state.json"
    if field is not None:
        edit_json(state_file, lambda state: state["trainer"].update({field: value}))
    before = digests(copy)
    code, out, err = in_process(train_main, "--output_dir", copy, "--resume", "latest",
                                *(extra or ["--max_steps", "3"]), capsys=capsys)
    one_error(code, err, fragment)
    assert digests(copy) == before and "Trained" not in out


@pytest.mark.parametrize("field, value", [("vocab_size", 3), ("n_positions", 2)])
def test_a_config_that_disagrees_with_its_weights_is_refused(field, value, tmp_path, capsys):
    """The weights' shapes silently won over config.json's sizes (exit 0)."""
    model = model_copy(tmp_path, config_edit(**{field: value}))
    before = digests(tmp_path)
    code, out, err = in_process(GENERATE, "--model", model, "--prompt", "Hi", "--max_new_tokens", "2", capsys=capsys)
    one_error(code, err, "in the weights, but config.json describes", "disagree")
    assert digests(tmp_path) == before
