"""Fault injection, round ten (issue #26): the cases round nine left as doubtful, and what round ten found, each
reduced to the smallest command that shows it. Helpers as in ``tests/test_faults.py``; every case runs through
:func:`minipeft.cli.run`, as the scripts do.
"""

import json
import os
import re
import shutil
import unittest.mock
from pathlib import Path

import pytest
import torch
from test_faults import builtin_model_available, in_process, one_error

from minipeft.cli import main as cli_main
from minipeft.cli.train import main as train_main

pytestmark = pytest.mark.skipif(not builtin_model_available(), reason="the built-in model is not built")
GENERATE = lambda argv: cli_main(["generate", *argv])  # noqa: E731
MERGE = lambda argv: cli_main(["merge", *argv])  # noqa: E731
MODIFY = lambda argv: cli_main(["modify", *argv])  # noqa: E731


def train(*args, capsys):
    return in_process(train_main, "--max_steps", "1", "--num_threads", "1", "--max_records", "16", *args,
                      capsys=capsys)


def tiny_llama(folder, **config_changes):
    """A two-block Llama written with ``save_pretrained`` (random weights), its config.json then changed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder,
                                                                                              max_shard_size="20KB")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, **config_changes)))
    return folder


# -- checkpoints ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tamper", ["delete the marker", "edit batches_done", "empty the marker",
                                    "garble the marker", "leave trainer_state.json out of the record"])
def test_a_checkpoint_that_cannot_be_told_from_an_edited_copy_is_not_resumed(tamper, tmp_path, capsys):
    """trainer_state.json's "batches_done" edited from 2 to 1 (in range) went on from the wrong place in the data,
    exit 0, once the checkpoint's .minipeft was deleted; with it, trainer_state.json was left out of its sha256
    check."""
    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, "--save_every", "1", "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    step = run / "checkpoints" / "step-2"
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["trainer"]["batches_done"] == 2
    state["trainer"]["batches_done"] = 1
    (step / "trainer_state.json").write_text(json.dumps(state, indent=1))
    if tamper == "delete the marker":
        (step / ".minipeft").unlink()
        expected = "no .minipeft marker (minipeft writes one into every checkpoint"
    elif tamper in ("empty the marker", "garble the marker"):  # (round eleven: read as an older minipeft's)
        (step / ".minipeft").write_text("{}" if tamper == "empty the marker" else "garbage")
        expected = "its .minipeft marker is not minipeft's record of its files (damaged, or an older minipeft's)"
    elif tamper == "leave trainer_state.json out of the record":
        marker = json.loads((step / ".minipeft").read_text())
        marker["files"].remove("trainer_state.json")
        (step / ".minipeft").write_text(json.dumps(marker))
        expected = "its .minipeft marker records no sha256 of trainer_state.json"
    else:
        expected = f"{step / 'trainer_state.json'} is not the file minipeft wrote there"
    code, _, err = train("--output_dir", run, "--resume", "latest", "--max_steps", "3", capsys=capsys)
    one_error(code, err, f"--resume {step}", expected)
    code, _, err = train("--output_dir", tmp_path / "again", "--resume", run / "checkpoints" / "step-1",
                         "--max_steps", "3", capsys=capsys)
    assert code == 0, err  # the earlier checkpoint, untouched, still continues the run (into a new folder)


def test_resume_new_data_is_the_commands_own_and_not_inherited_by_later_resumes(tmp_path, capsys):
    """Once a --resume_new_data resume had finished a run, every later --resume latest took the flag from
    train_config.json: another --batch_size or --dataset_path was accepted, exit 0, and recorded as the run's."""
    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, "--save_every", "1", "--max_steps", "3", "--batch_size", "4",
                         capsys=capsys)
    assert code == 0, err
    shutil.rmtree(run / "checkpoints" / "step-3")  # as if stopped after step 2: the new-data resume ends the run
    code, _, err = train("--output_dir", run, "--resume", "latest", "--resume_new_data", "--max_steps", "3",
                         capsys=capsys)
    assert code == 0, err
    recorded = (run / "train_config.json").read_text()
    code, _, err = train("--output_dir", run, "--resume", "latest", "--max_steps", "3", "--batch_size", "2",
                         capsys=capsys)
    one_error(code, err, "--batch_size 2 changes what the run computes (it started with 4)")
    assert (run / "train_config.json").read_text() == recorded


def test_a_saved_position_the_run_cannot_reach_is_refused_even_where_no_record_names_the_file(tmp_path):
    """The position checks behind the sha256 record (a checkpoint an older minipeft wrote records none): an epoch
    count beyond the step count, more batches than an epoch of this data."""
    from minipeft.core.errors import UserError
    from minipeft.training.resume_checks import check_position_fits
    from minipeft.training.state import TrainState

    with pytest.raises(UserError, match="epoch 1000000000000 with only 2 steps"):
        check_position_fits(TrainState(step=2, epoch=10 ** 12), tmp_path, "latest", 4, 10)
    with pytest.raises(UserError, match="is 9 batches into epoch 0, but this run's data gives only 4 batches"):
        check_position_fits(TrainState(step=2, batches_done=9), tmp_path, "latest", 4, 10)
    check_position_fits(TrainState(step=2, epoch=1, batches_done=1), tmp_path, "latest", 4, 10)  # fits


# -- merge, modify, generate ------------------------------------------------------------------------------------------
def test_requantize_on_a_float_base_is_refused(adapter, tmp_path, capsys):
    """merge --requantize on an adapter trained on a float base quantized the merged model to NF4, a model that
    never existed, exit 0 (the help says "to NF4 again")."""
    code, _, err = in_process(MERGE, "--adapter", adapter, "--out", tmp_path / "merged", "--requantize",
                              capsys=capsys)
    one_error(code, err, "--requantize quantizes the merged weights of an NF4 base again, and this base is not "
                         "quantized")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("flags, fragment", [(["--lora_rank", "0"], "--lora_rank must be a positive integer"),
                                             (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)")])
def test_modify_refuses_a_method_flag_before_loading_the_model(flags, fragment, capsys, monkeypatch):
    """modify loaded the model (transformers' progress bar on stderr) before saying a flag could not work."""
    import minipeft.cli.modify as modify

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(modify, "load_model_for_counting", never)
    code, _, err = in_process(MODIFY, "--model", "builtin", *flags, capsys=capsys)
    one_error(code, err, fragment)


def test_ia3_feedforward_modules_outside_the_default_targets_are_refused_before_loading(capsys, monkeypatch):
    """The check ran on the loaded model, after transformers' progress bar, naming "feedforward_modules" (no
    --), since the family's default targets were filled in only then."""
    import minipeft.cli.modify as modify

    monkeypatch.setattr(modify, "load_model_for_counting", lambda *args: pytest.fail("the model was loaded"))
    code, _, err = in_process(MODIFY, "--model", "builtin", "--modification_type", "ia3", "--feedforward_modules",
                              "c_fc", capsys=capsys)
    one_error(code, err, "--feedforward_modules: c_fc not among the target modules ['c_attn', 'mlp.c_proj'] "
                         "(--target_modules, or the method's default")


def test_a_csv_prompts_file_is_read_as_records_as_data_reads_it(tmp_path):
    """generate read a .csv as lines of text: its header became prompt 1 and each row 'Say 19,,Number 19.'."""
    from minipeft.core.errors import UserError
    from minipeft.inference.prompts import read_prompts_file

    path = tmp_path / "prompts.csv"
    path.write_text('instruction,input,output\nSay 19,,Number 19.\n"Add, please","1, 2",3\n')
    assert [(prompt.instruction, prompt.input) for prompt in read_prompts_file(path)] == [
        ("Say 19", ""), ("Add, please", "1, 2")]
    tsv = tmp_path / "prompts.tsv"
    tsv.write_text("instruction\nName a colour\n")
    assert [prompt.instruction for prompt in read_prompts_file(tsv)] == ["Name a colour"]
    path.write_text("question,answer\nwhy,because\n")
    with pytest.raises(UserError, match=r"prompts.csv: no 'instruction' column \(columns found: question, answer\)"):
        read_prompts_file(path)
    path.write_text("instruction,input\nfine,\ntoo,many,fields\n")
    with pytest.raises(UserError, match="prompts.csv: row 2 has 3 fields, the header has 2"):
        read_prompts_file(path)


@pytest.mark.parametrize("name, text, expected", [
    ("list.json", '["x", "y"]', [("x", ""), ("y", "")]),
    ("lines.txt", "bom line\nsecond\n", [("bom line", ""), ("second", "")]),
    ("lines.jsonl", '{"instruction": "a"}\n', [("a", "")]),
    ("rows.csv", "instruction,input\nb,c\n", [("b", "c")]),
])
def test_a_prompts_file_with_a_byte_order_mark_reads_as_without_it(name, text, expected, tmp_path):
    """Notepad's and Excel's UTF-8 byte-order mark made a JSON list ONE prompt (its source text, exit 0), went to
    the model as part of a text file's first prompt, and was "not valid JSON" in JSON Lines; data read them all."""
    from minipeft.inference.prompts import read_prompts_file

    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [(prompt.instruction, prompt.input) for prompt in read_prompts_file(path)] == expected


def test_a_json_prompts_file_of_json_lines_reads_its_strings_not_their_quotes(tmp_path):
    """A .json file holding JSON Lines of strings fell back to lines of text: the prompts kept their quotes."""
    from minipeft.core.errors import UserError
    from minipeft.inference.prompts import read_prompts_file

    path = tmp_path / "prompts.json"
    path.write_text('"a"\n"b"\n')
    assert [prompt.instruction for prompt in read_prompts_file(path)] == ["a", "b"]
    path.write_text("a prompt in a .json file\n")
    with pytest.raises(UserError, match="line 1 is not valid JSON .*a JSON prompts file holds a list, or one JSON"):
        read_prompts_file(path)


# -- model folders ----------------------------------------------------------------------------------------------------
def test_a_tensor_stored_in_two_shards_is_refused_naming_both(tmp_path, capsys):
    """A shard holding a (zeroed) copy of another shard's tensor was loaded, the copy taken, exit 0."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama(tmp_path / "llama")
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.embed_tokens.weight"
    other = sorted(set(index.values()) - {index[name]})[-1]
    tensors = load_file(model / other)
    tensors[name] = load_file(model / index[name])[name] * 0
    save_file(tensors, model / other, metadata={"format": "pt"})
    code, _, err = in_process(GENERATE, "--model", model, "--prompt", "hi", "--max_new_tokens", "1", capsys=capsys)
    one_error(code, err, f"holds tensor {name}, which", "a checkpoint stores each tensor once")


@pytest.mark.parametrize("value", ["int8", "uint8", 5])
def test_a_config_whose_dtype_is_not_floating_point_is_refused(value, tmp_path, capsys):
    """"torch_dtype": "int8" in config.json was accepted in silence (the weights read as floats)."""
    model = tiny_llama(tmp_path / "llama", torch_dtype=value)
    code, _, err = in_process(GENERATE, "--model", model, "--prompt", "hi", "--max_new_tokens", "1", capsys=capsys)
    one_error(code, err, f'--model {model / "config.json"}: "torch_dtype" must be a floating-point dtype')
    tiny_llama(tmp_path / "fine", torch_dtype="bfloat16")
    code, _, err = in_process(GENERATE, "--model", tmp_path / "fine", "--prompt", "hi", "--max_new_tokens", "1",
                              capsys=capsys)
    assert "torch_dtype" not in err  # (no tokenizer: refused for that, not for its dtype)


# -- round eleven -----------------------------------------------------------------------------------------------------
DATA = lambda argv: cli_main(["data", *argv])  # noqa: E731


@pytest.mark.parametrize("where", ["the model folder", "below the model folder", "an adapter folder",
                                   "the package"])
def test_the_tokenization_cache_never_goes_into_a_model_an_adapter_or_the_package(where, adapter, tmp_path,
                                                                                   capsys):
    """data --cache_dir wrote its .npz into the --model folder (rewriting its .minipeft record to list it), into
    an adapter folder, and into minipeft's own built-in model (a tracked file changed), exit 0."""
    import minipeft
    from minipeft.builtin import MODEL_DIR
    from test_faults import digests

    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    package = Path(minipeft.__file__).parent
    cache, fragment = {
        "the model folder": (model, f"--cache_dir {model}: is the folder --model reads"),
        "below the model folder": (model / "sub", f"lies inside {model}, the folder --model reads"),
        "an adapter folder": (adapter, "is a folder minipeft wrote"),
        "the package": (package / "builtin", f"lies inside {package}, minipeft's own package"),
    }[where]
    before = digests(model, adapter, package / "builtin")
    for command in (DATA, train_main):
        argv = ["--model", model, "--cache_dir", cache, "--max_records", "16"]
        if command is train_main:
            argv += ["--max_steps", "1", "--output_dir", tmp_path / "run"]
        code, _, err = in_process(command, *argv, capsys=capsys)
        one_error(code, err, fragment)
    assert digests(model, adapter, package / "builtin") == before and not (model / "sub").exists()


def test_quantizing_a_dequantized_layer_again_moves_it_only_through_the_double_quantized_scales():
    """merge --requantize reported a 0.51 logit change for an all-zero LoRA on SmolLM2, which round eleven doubted:
    the message now says why. NF4 codes are idempotent; the block scales, 8-bit coded anew around another offset
    under double quantization, are not."""
    from torch import nn

    from minipeft.quantization.nf4 import Linear4bit

    torch.manual_seed(0)
    layer = nn.Linear(128, 64, bias=False)
    layer.weight.data[:, :4] *= 100  # blocks of very different scales, as in a trained model
    for double_quant, moves in ((False, False), (True, True)):
        once = Linear4bit(layer, double_quant, torch.float32).to_dense(torch.float32)
        twice = Linear4bit(once, double_quant, torch.float32).to_dense(torch.float32)
        assert torch.equal(once.weight, twice.weight) is not moves


def test_a_checkpoint_deletion_killed_part_way_leaves_a_folder_the_next_run_deletes(tmp_path, capsys):
    """A SIGKILL inside the deletion of an old checkpoint (renamed .old-step-N-PID) removed its .minipeft first
    (rmtree's order): the rest stayed for good, and --overwrite_output_dir then said minipeft did not write it.
    The marker now goes last, so what a kill leaves still says it is minipeft's."""
    from minipeft.files.safe_files import delete_marker_last

    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, "--save_every", "1", "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    doomed = run / "checkpoints" / ".old-step-1-99999"
    shutil.copytree(run / "checkpoints" / "step-2", doomed)
    deleted = []
    real_unlink = Path.unlink

    def unlink_then_die(self, *args, **kwargs):  # the kill, just before the marker would go
        if self.name == ".minipeft" and self.parent == doomed:
            raise KeyboardInterrupt
        deleted.append(self.name)
        return real_unlink(self, *args, **kwargs)

    with unittest.mock.patch.object(Path, "unlink", unlink_then_die):
        with pytest.raises(KeyboardInterrupt):
            delete_marker_last(doomed)
    assert deleted and (doomed / ".minipeft").exists() and sorted(p.name for p in doomed.iterdir()) == [".minipeft"]
    (run / "..minipeft.abc123.tmp").write_text("{")  # a marker rewrite a kill cut short
    code, _, err = train("--output_dir", run, "--resume", "latest", "--max_steps", "3", capsys=capsys)
    assert code == 0, err
    assert not doomed.exists() and not (run / "..minipeft.abc123.tmp").exists()


def test_resume_latest_of_a_run_killed_before_it_made_its_folder_starts_it(tmp_path, capsys):
    """A run killed while Python imported (no folder yet): its --resume latest said "no checkpoint in ...", exit 2,
    where docs/training.md promises that a loop of --resume latest always gets there."""
    code, out, err = train("--output_dir", tmp_path / "run", "--resume", "latest", capsys=capsys)
    assert code == 0, err
    assert "holds no checkpoint yet (the run stopped before its first, or before it began); starting it over" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("a user's folder, no run in it")
    code, _, err = train("--output_dir", tmp_path / "notes", "--resume", "latest", capsys=capsys)
    one_error(code, err, "--resume latest: no checkpoint in")  # a folder of other files is no run to start


# -- round twelve -----------------------------------------------------------------------------------------------------
def test_under_torchrun_every_process_stops_on_a_refusal_with_its_line_not_a_traceback(tmp_path):
    """A resume refused for a changed flag stopped rank 0 only (it alone compares with train_config.json): rank 1
    went on into a collective and died in a gloo traceback. --fsdp_cpu_offload on the CPU: FSDP's RuntimeError
    "Cannot access accelerator device" in both processes."""
    import subprocess
    import sys

    from test_training_fsdp import free_port

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}

    def torchrun(*flags):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), str(root / "train_llm.py"), "--max_records", "16", "--batch_size", "2",
                   "--no_cache", "--device", "cpu", *map(str, flags)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        return done.returncode, done.stdout + done.stderr

    code, out = torchrun("--max_steps", "2", "--save_every", "1", "--output_dir", tmp_path / "run")
    assert code == 0, out[-3000:]
    for flags, line in (
            (["--max_steps", "3", "--val_size", "3", "--output_dir", tmp_path / "run", "--resume", "latest"],
             "error: --resume: --val_size 3 changes what the run computes (it started with 0.1)"),
            (["--max_steps", "1", "--sharding", "fsdp", "--fsdp_cpu_offload", "--output_dir", tmp_path / "offload"],
             "error: --fsdp_cpu_offload keeps a GPU run's pieces in host memory; this run computes on the CPU")):
        code, out = torchrun(*flags)
        assert code != 0 and out.count(line) == 2, out[-3000:]  # each process's own line (the README says so)
        assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out, out[-3000:]
    assert not (tmp_path / "offload").exists()



def test_another_runs_checkpoint_is_not_continued_in_a_folder_holding_a_run(tmp_path, capsys):
    """Run B's checkpoint resumed into run A's folder was compared with A's record (the folder's) and then with
    B's (the checkpoint's): each refusal named the other run's data file, so neither could pass."""
    code, _, err = train("--output_dir", tmp_path / "B", "--save_every", "1", "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    code, _, err = train("--output_dir", tmp_path / "A", capsys=capsys)
    assert code == 0, err
    step = tmp_path / "B" / "checkpoints" / "step-2"
    code, _, err = train("--output_dir", tmp_path / "A", "--resume", step, "--max_steps", "3", capsys=capsys)
    one_error(code, err, f"continues the run in {tmp_path / 'B'}, but --output_dir {tmp_path / 'A'} holds another "
                         f"run; continue it in its own folder (--output_dir {tmp_path / 'B'}), or into a new one")
    code, _, err = train("--output_dir", tmp_path / "C", "--resume", step, "--max_steps", "3", capsys=capsys)
    assert code == 0, err  # a new folder takes it


@pytest.mark.parametrize("header", [b'{"a":1}', b"[1, 2]", b'"text"', b"null",
                                    b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}'])
def test_a_weights_file_whose_header_is_not_tensors_is_one_line(header, tmp_path, capsys):
    """A safetensors header of another JSON shape ended in AttributeError in read_header (generate, merge)."""
    import struct

    model = tiny_llama(tmp_path / "llama")
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shard.write_bytes(struct.pack("<Q", len(header)) + header)
    code, _, err = in_process(GENERATE, "--model", model, "--prompt", "hi", "--max_new_tokens", "1", capsys=capsys)
    one_error(code, err, f"--model {shard}: not a safetensors file")


@pytest.mark.parametrize("encoding, fragment", [
    ("utf-16-le", "holds NUL bytes (the first at offset 1), which no text has: a UTF-16 file? save it as UTF-8"),
    ("utf-16", "is UTF-16 text (it starts with UTF-16's byte-order mark); save it as UTF-8"),
    ("utf-32", "is UTF-32 text (it starts with UTF-32's byte-order mark); save it as UTF-8")])
@pytest.mark.parametrize("name", ["prompts.txt", "prompts.csv", "data.json", "data.csv"])
def test_a_utf16_or_utf32_file_is_refused_as_such_with_or_without_its_mark(name, encoding, fragment, tmp_path):
    """UTF-16 without its byte-order mark was read as UTF-8 with a NUL after every letter: prompts answered, exit
    0 (round twelve); data blamed on "no 'instruction' column". With its mark: "not utf-8 text (byte 0xff)"."""
    from minipeft.core.errors import UserError
    from minipeft.data.loading import load_records
    from minipeft.inference.prompts import read_prompts_file

    path = tmp_path / name
    text = ("instruction,output\nName a colour.,Red.\n" if name.endswith(".csv") else
            json.dumps([{"instruction": "Name a colour.", "output": "Red."}]))
    path.write_bytes(text.encode(encoding))
    read = read_prompts_file if name.startswith("prompts") else load_records
    with pytest.raises(UserError, match=re.escape(fragment)) as raised:
        read(path)
    assert str(path) in str(raised.value)


# --- round thirteen ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, where", [
    ("p.json", '[""]', "item 0"), ("p.json", '["ok", "  "]', "item 1"),
    ("p.json", '[{"instruction": "   ", "input": "x"}]', "item 0"), ("p.jsonl", '"ok"\n{"instruction": ""}', "line 2"),
    ("p.csv", "instruction,input\nok,\n\t,x\n", "row 2")])
def test_a_prompts_file_with_an_empty_instruction_is_refused_naming_the_item(name, text, where, tmp_path, capsys):
    """An empty or blank instruction in a JSON, JSON Lines or CSV prompts file was answered (a reply to nothing,
    written as a row), exit 0, where ``--prompt ''`` is refused."""
    path = tmp_path / name
    path.write_text(text)
    code, _, err = in_process(GENERATE, "--prompts_file", path, "--max_new_tokens", "1", "--no_stream",
                              capsys=capsys)
    one_error(code, err, f"--prompts_file {path}: {where}: the instruction is empty")


def test_a_sharded_runs_resume_on_one_process_names_the_runs_flag_not_the_users(tmp_path, capsys, monkeypatch):
    """``--resume latest`` of an FSDP run without torchrun blamed "--sharding fsdp: start the run with torchrun", a
    flag the user never typed (it is the run's, from train_config.json)."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, "--save_every", "1", capsys=capsys)
    assert code == 0, err
    record = json.loads((run / "train_config.json").read_text())
    record["arguments"]["sharding"] = "fsdp"  # (as a torchrun --sharding fsdp run records it)
    (run / "train_config.json").write_text(json.dumps(record))
    code, _, err = train("--output_dir", run, "--resume", "latest", capsys=capsys)
    one_error(code, err, f"--resume: the run in {run} was started sharded (--sharding fsdp, from its "
                         "train_config.json); continue it under torchrun as it was started, or on one process with "
                         "--sharding ddp --resume_new_data")
    code, _, err = train("--output_dir", run, "--resume", "latest", "--sharding", "fsdp", capsys=capsys)
    one_error(code, err, "--sharding fsdp: start the run with torchrun")  # given: the user's flag


@pytest.mark.parametrize("interrupt, status", [(KeyboardInterrupt, 130), (SystemExit(143), 143)])
def test_an_interrupt_while_the_summary_is_written_says_what_is_missing_and_a_resume_writes_it(
        interrupt, status, tmp_path, capsys):
    """Ctrl-C or SIGTERM after the last step (while metrics.json and the curve were written) exited with a bare
    "interrupted", or with nothing at all (SIGTERM), where mid-run it names the way on."""
    run = tmp_path / "run"
    with unittest.mock.patch("minipeft.cli.train.nonfinite_to_none", side_effect=interrupt):  # metrics.json's
        code, _, err = train("--output_dir", run, capsys=capsys)
    assert code == status
    assert err.strip().splitlines()[-1] == (
        f"interrupted after the last step: the adapter is saved in {run / 'adapter'}; the summary (metrics.json, "
        f"train_config.json's plan, loss_curve.png) may be missing: write it with --resume latest --output_dir {run}")
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "metrics.json").exists()
    code, _, err = train("--output_dir", run, "--resume", "latest", capsys=capsys)
    assert code == 0, err
    assert "plan" in json.loads((run / "train_config.json").read_text())
    assert json.loads((run / "metrics.json").read_text())["steps"] == 1


def test_a_runs_file_reached_through_a_link_to_its_folder_is_named_as_part_of_it(tmp_path, capsys):
    """``generate --output_file LINK/metrics.json --overwrite`` (LINK a link to a run) said "minipeft did not write
    it": the run's marker is not trusted through a link, but the file is the run's all the same."""
    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, capsys=capsys)
    assert code == 0, err
    (tmp_path / "link").symlink_to(run)
    before = (run / "metrics.json").read_bytes()
    code, _, err = in_process(GENERATE, "--prompt", "hi", "--max_new_tokens", "1", "--no_stream", "--overwrite",
                              "--output_file", tmp_path / "link" / "metrics.json", capsys=capsys)
    one_error(code, err, "already exists and is part of a folder minipeft wrote (an adapter, a run, a model)")
    assert (run / "metrics.json").read_bytes() == before


# --- round fourteen ------------------------------------------------------------------------------------------

def test_an_adapter_saved_by_modify_on_a_4bit_base_records_it_as_a_trained_one_does(tmp_path, capsys):
    """``modify --quantize nf4 --save_adapter DIR`` wrote no record of the 4-bit base: generate and merge then
    used the float base in silence, and ``merge --requantize`` was refused ("the adapter records none")."""
    saved = tmp_path / "adapter"
    code, _, err = in_process(MODIFY, "--model", "builtin", "--table", "none", "--quantize", "nf4", "--save_adapter", saved,
                              capsys=capsys)
    assert code == 0, err
    record = json.loads((saved / "adapter_config.json").read_text())["minipeft"]
    assert record["quantization"] == {"quantize": "nf4", "quantize_lm_head": False}
    code, out, err = in_process(GENERATE, "--adapter", saved, "--prompt", "hi", "--max_new_tokens", "1",
                                "--no_stream", capsys=capsys)
    assert code == 0, err
    assert "NF4" in out + err  # the base rebuilt in 4 bits, as for a trained adapter
    code, _, err = in_process(MERGE, "--adapter", saved, "--out", tmp_path / "merged", "--requantize", capsys=capsys)
    assert code == 0, err


def test_an_output_file_under_a_file_is_refused_before_the_work(tmp_path, capsys):
    """``generate --output_file d/a.json/x.jsonl`` (``d/a.json`` a file) generated every prompt, then failed."""
    (tmp_path / "a.json").write_text("{}")
    target = tmp_path / "a.json" / "x.jsonl"
    with unittest.mock.patch("minipeft.cli.generate.load_for_generation", side_effect=AssertionError) as load:
        code, _, err = in_process(GENERATE, "--prompt", "hi", "--output_file", target, capsys=capsys)
    one_error(code, err, f"--output_file {target}: {tmp_path / 'a.json'} is a file, not a folder to write into")
    assert not load.called


def test_the_batching_line_does_not_claim_a_rounding_that_max_length_stops():
    """``--padding max_length --pad_to_multiple_of 7`` (max_length 256) printed "rounded up to a multiple of 7"
    beside batches 256 wide: the rounding never goes past --max_length."""
    from minipeft.data.config import DataConfig
    from minipeft.data.report import describe_batching

    line = describe_batching(DataConfig(padding="max_length", max_length=256, pad_to_multiple_of=7))
    assert "padded to 256, not rounded to a multiple of 7 (never past --max_length)" in line
    assert "rounded up to a multiple of 8," in describe_batching(DataConfig(max_length=256, pad_to_multiple_of=8))


def test_a_run_is_not_written_into_a_model_folder_or_minipefts_package(adapter, tmp_path, capsys):
    """``train --output_dir MERGED`` (a folder ``merge`` wrote) put the run's files beside the model, exit 0; a later
    ``merge --overwrite`` of it then said "not a model folder". ``--output_dir minipeft/builtin`` wrote a run into
    the package."""
    from minipeft.files.safe_files import PACKAGE_DIR

    merged = tmp_path / "merged"
    code, _, err = in_process(MERGE, "--adapter", adapter, "--out", merged, capsys=capsys)
    assert code == 0, err
    before = sorted(path.name for path in merged.iterdir())
    code, _, err = train("--output_dir", merged, capsys=capsys)
    one_error(code, err, f"--output_dir {merged}: is a model folder minipeft wrote (merge, pretrain)")
    assert sorted(path.name for path in merged.iterdir()) == before
    for inside in (PACKAGE_DIR / "builtin", PACKAGE_DIR / "builtin" / "new-run"):
        code, _, err = train("--output_dir", inside, capsys=capsys)
        one_error(code, err, f"--output_dir {inside}: lies in minipeft's own package")
        assert not (PACKAGE_DIR / "builtin" / "new-run").exists()


# --- round fifteen -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_packing_with_virtual_tokens_is_refused_naming_the_flags_before_the_run(method, tmp_path, capsys):
    """``--modification_type prefix --packing`` stopped at the first batch with "position_ids: packed batches ...",
    naming no flag."""
    code, _, err = train("--output_dir", tmp_path / "run", "--modification_type", method, "--packing",
                         capsys=capsys)
    one_error(code, err, f"--packing with --modification_type {method}: its virtual tokens come once per row")
    assert not (tmp_path / "run").exists()


def test_under_torchrun_only_rank_0_says_a_signal_arrived(monkeypatch, capsys):
    """Every process of a torchrun launch gets Ctrl-C: each printed "SIGINT: finishing this step ..."."""
    import signal

    from minipeft.training.signals import StopRequest

    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        stop = StopRequest()
        stop._handle(signal.SIGTERM, None)
        assert stop.requested and stop.signal_number == signal.SIGTERM  # every process stops, whoever says so
        assert ("SIGTERM: finishing this step" in capsys.readouterr().out) == said


@pytest.mark.parametrize("command", ["modify", "generate"])
def test_a_config_whose_vocab_size_disagrees_with_the_weights_is_one_line_naming_both(command, tmp_path, capsys):
    """``modify`` (transformers' from_pretrained for a small folder) printed transformers' ten-line load report and
    blamed ``ignore_mismatched_sizes`` and "download it again"; generate named config.json and the weights."""
    model = tiny_llama(tmp_path / "llama", vocab_size=100)
    argv = (["--model", model, "--table", "none"] if command == "modify" else
            ["--model", model, "--prompt", "hi", "--max_new_tokens", "1"])
    code, out, err = in_process(MODIFY if command == "modify" else GENERATE, *argv, capsys=capsys)
    one_error(code, err, "has shape", "in the weights, but config.json describes", "config.json and the weights "
                         "disagree")
    assert "LOAD REPORT" not in out + err and "ignore_mismatched_sizes" not in err


# --- round sixteen -------------------------------------------------------------------------------------------
COMPARE = lambda argv: cli_main(["compare", *argv])  # noqa: E731
QUICK_COMPARE = ("--methods", "lora", "--max_steps", "1", "--eval_max_batches", "1", "--generation_tokens", "2",
                 "--speed_tokens", "2")


@pytest.mark.parametrize("flags, fragment", [
    (("--max_records", "16", "--template", "chat"), "--template chat: the tokenizer"),
    (("--max_records", "1"), "--max_records: 1 usable record(s); compare needs at least 2 (one to train on, one "
                             "held out to evaluate)")])
def test_a_compare_refused_after_reading_the_data_leaves_no_folder_to_block_the_rerun(flags, fragment, tmp_path,
                                                                                       capsys):
    """A compare refused once it had sampled the records left ``.minipeft`` and ``records.json``: the corrected
    command was then refused as "holds an earlier comparison's outputs". ``--max_records 1`` blamed ``--val_size``,
    a flag not given (and ``--val_size 1``, as advised, was refused too)."""
    out = tmp_path / "cmp"
    code, _, err = in_process(COMPARE, *QUICK_COMPARE, *flags, "--output_dir", out, capsys=capsys)
    one_error(code, err, fragment)
    assert not out.exists()


def test_sighup_once_the_work_is_done_is_ignored_like_the_other_stop_signals():
    """A SIGHUP after the last output killed compare and train with 129, where SIGTERM at that moment was ignored
    (the README: a signal once the work is done and the outputs are complete changes nothing)."""
    import signal

    from minipeft.cli import ignore_late_interrupts

    names = ("SIGINT", "SIGTERM", "SIGHUP")
    before = {name: signal.getsignal(getattr(signal, name)) for name in names}
    try:
        ignore_late_interrupts()
        assert all(signal.getsignal(getattr(signal, name)) is signal.SIG_IGN for name in names)
    finally:
        for name, handler in before.items():
            signal.signal(getattr(signal, name), handler)


def test_a_generation_speed_not_measured_is_not_printed_as_zero(tmp_path):
    """A sharded run's summary said "generation 0 tokens/s" beside ``"inference_tokens_per_s": null``."""
    from types import SimpleNamespace

    from minipeft.training.report import summary_lines

    state = SimpleNamespace(eval_loss=None, eval_loss_before=None, step=2, train_seconds=0.5, best_step=None)
    summary = {"train_tokens_per_s": 3525.0, "inference_tokens_per_s": None, "peak_memory_mb": 444.0,
               "adapter_size_bytes": 1}
    line = next(line for line in summary_lines(summary, SimpleNamespace(state=state), "lora", 1e-3, tmp_path)
                if line.startswith("Trained"))
    assert "generation not measured (sharded)" in line and "0 tokens/s" not in line.replace("3,525 tokens/s", "")
    summary["inference_tokens_per_s"] = 263.4
    assert "generation 263 tokens/s" in summary_lines(summary, SimpleNamespace(state=state), "lora", 1e-3,
                                                        tmp_path)[1]


def test_another_output_inside_a_folder_is_named_as_minipefts_not_as_the_users(adapter, tmp_path, capsys):
    """``merge --out MERGED/inner`` (kept apart inside an earlier merge's folder), then ``merge --out MERGED
    --overwrite``: refused, rightly, but saying MERGED/inner is something "minipeft did not write"."""
    merged = tmp_path / "merged"
    for out in (merged, merged / "inner"):
        code, _, err = in_process(MERGE, "--adapter", adapter, "--out", out, capsys=capsys)
        assert code == 0, err
    code, _, err = in_process(MERGE, "--adapter", adapter, "--out", merged, "--overwrite", capsys=capsys)
    one_error(code, err, f"{merged / 'inner'}, which is another output minipeft wrote (it has its own .minipeft "
                         "record), not part of this folder")
    assert (merged / "inner" / "config.json").is_file()


@pytest.mark.parametrize("command", ["data", "train", "modify"])
def test_a_mistyped_flag_points_to_the_help_of_the_command_the_user_ran(command, capsys):
    """``python -m minipeft data --bogus`` pointed to ``python data_pipeline.py --help`` (and modify's to
    ``modify_llm.py --help``, without python)."""
    from minipeft.cli import CommandLineParser

    with pytest.raises(SystemExit) as leaving:  # (argparse's exit: the process ends there)
        cli_main([command, "--bogus"])
    assert leaving.value.code == 2 and CommandLineParser.invoked_as is None  # (set for that command only)
    assert capsys.readouterr().err.splitlines()[-1] == f"(see python -m minipeft {command} --help)"


# --- round seventeen -----------------------------------------------------------------------------------------

def test_a_csv_row_of_spaces_is_a_record_and_every_row_keeps_its_number(tmp_path):
    """A row whose cells held only spaces was dropped without a word and not counted: every later row was named
    one too low ("row 3: the instruction is empty" for row 4), and data said "Skipped 1 of 3 records"."""
    from minipeft.core.errors import UserError
    from minipeft.data.loading import load_records
    from minipeft.inference.prompts import read_prompts_file

    path = tmp_path / "p.csv"
    path.write_text('instruction,input\nOne,\n,\n"   ",\n\nTwo,\n')  # rows 1-4 (row 2 empty cells; a blank line)
    with pytest.raises(UserError, match=re.escape(f"--prompts_file {path}: row 3: the instruction is empty")):
        read_prompts_file(path)
    data = tmp_path / "d.csv"
    data.write_text('instruction,output\nOne,1\n"   ",\n,,\nTwo,2\nThree,3\nFour,4\n')
    loaded = load_records(data, max_invalid_fraction=0.5)
    assert [record.instruction for record in loaded.records] == ["One", "Two", "Three", "Four"]
    assert [where for where, _ in loaded.skipped] == ["row 2"]
