"""Fault injection, what round four left (issue #26): each case is a misbehaviour that round's ~400 commands found
and the landing after it did not fix, reduced to the smallest command that showed it. Helpers as in
``tests/test_faults_round3.py``; every case runs through :func:`minipeft.cli.run`, as the scripts do.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from test_faults import GENERATE, builtin_model_available, digests, in_process, one_error, records, write_records

pytestmark = pytest.mark.skipif(not builtin_model_available(), reason="the built-in model is not built")


def train(*args, capsys):
    from minipeft.cli.train import main as train_main

    return in_process(train_main, "--max_steps", "1", "--num_threads", "1", "--val_size", "0", *args, capsys=capsys)


# -- what users bring: data files ----------------------------------------------------------------------------------
def test_an_edited_tokenization_cache_is_tokenized_again_not_trained_on(tmp_path, capsys):
    """Ids beyond the vocabulary planted in ``tokenized-*.npz`` ended in an IndexError inside the embedding (round
    four), ids within it were trained on without a word (round six): the cache's name is a hash of its inputs,
    so the file stores a digest of its content, and a content that passes the digest is still checked."""
    from minipeft.data.tokenization import _content_digest

    data, cache = write_records(tmp_path / "data.json", records(12)), tmp_path / "cache"
    code, _, err = train("--dataset_path", data, "--cache_dir", cache, "--output_dir", tmp_path / "one", capsys=capsys)
    assert code == 0, err
    [cached] = cache.glob("tokenized-*.npz")
    with np.load(cached) as arrays:
        saved = {name: arrays[name] for name in arrays.files}
    edits = [(lambda a: a["token_ids"].fill(7), False, "does not match its own digest"),  # within the vocabulary
             (lambda a: a["token_ids"].__setitem__(0, 10 ** 6), False, "does not match its own digest"),
             (lambda a: a["token_ids"].__setitem__(0, 10 ** 6), True, "holds token ids outside the tokenizer's"),
             (lambda a: a.update(offsets=a["offsets"][:-1]), True, "holds another number of records"),
             (lambda a: a["prompt_lengths"].__setitem__(0, 10 ** 6), True, "holds prompt lengths beyond")]
    for index, (edit, new_digest, problem) in enumerate(edits):
        arrays = {name: value.copy() for name, value in saved.items()}
        edit(arrays)
        if new_digest:  # (as another program writing the cache's layout would)
            arrays["digest"] = _content_digest(arrays)
        np.savez(cached, **arrays)
        code, _, err = train("--dataset_path", data, "--cache_dir", cache, "--output_dir", tmp_path / f"run{index}",
                             capsys=capsys)
        assert code == 0 and "Traceback" not in err, err
        assert f"warning: the tokenization cache {cached}" in err and problem in err and "tokenizing again" in err
        with np.load(cached) as rewritten:  # the cache is good again
            assert all(np.array_equal(rewritten[name], saved[name]) for name in saved)


@pytest.mark.parametrize("text, fragment", [
    ("instruction,input,output\nSay a,,a\nSay b,x,b,EXTRA\nSay c,,c\n", None),  # the shifted row is skipped
    ("instruction,output,output\nSay a,a,A\n", "the header names column 'output' 2 times (columns 2, 3)"),
])
def test_a_csv_row_of_other_width_or_a_doubled_column_is_never_read_shifted(text, fragment, tmp_path):
    """A row with a field too many shifted every column (its instruction became the input); of two 'output'
    columns the second was silently dropped."""
    from minipeft.core.errors import UserError
    from minipeft.data.loading import load_records

    path = tmp_path / "data.csv"
    path.write_text(text)
    if fragment is not None:
        with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            load_records(path)
        return
    loaded = load_records(path, max_invalid_fraction=0.5)
    assert [(record.instruction, record.output) for record in loaded.records] == [("Say a", "a"), ("Say c", "c")]
    assert loaded.skipped == [("row 2", "has 4 fields, the header has 3")]
    assert loaded.columns == ["input", "instruction", "output"]


def test_csv_cells_of_any_length_and_quoted_newlines_are_read(tmp_path):
    from minipeft.data.loading import load_records

    path = tmp_path / "data.csv"
    long = "x" * 300_000  # past the csv module's default field limit of 131,072
    path.write_text(f'instruction,output\n"two\nlines",ok\n\nlong,{long}\n')
    loaded = load_records(path)
    assert [(record.instruction, record.output) for record in loaded.records] == [("two\nlines", "ok"), ("long", long)]
    assert [record.source for record in loaded.records] == ["row 1", "row 2"]


@pytest.mark.parametrize("flags, fragment", [
    (["--input_column", "context"], "data.json: no 'context' column (columns found: input, instruction, output); "
                                    "name the right one with --input_column"),
    (["--instruction_column", "output"], "--instruction_column output: the same column as --output_column"),
    (["--input_column", " "], "--input_column ' ': an empty column name"),
])
def test_a_column_flag_that_names_no_column_or_another_roles_is_refused(flags, fragment, tmp_path, capsys):
    """``--input_column`` naming a missing column trained without inputs; one column for two roles trained the
    model to repeat its prompt. Both exit 0 before."""
    data = write_records(tmp_path / "data.json", records(12))
    code, _, err = train("--dataset_path", data, *flags, "--no_cache", "--output_dir", tmp_path / "out", capsys=capsys)
    one_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


# -- what users bring: prompts files -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["prompts.jsonl", "prompts.txt"])
def test_a_json_lines_prompts_file_is_read_as_such(name, tmp_path):
    """Each line, braces and all, was a prompt: the model was asked '{"instruction": ...}'."""
    from minipeft.core.errors import UserError
    from minipeft.inference.prompts import Prompt, read_prompts_file

    path = tmp_path / name
    path.write_text('{"instruction": "Add 2 and 3.", "input": "x"}\n\n"Say hi."\n')
    assert read_prompts_file(path) == [Prompt("Add 2 and 3.", "x"), Prompt("Say hi.")]
    path.write_text('{"instruction": "Add 2 and 3."}\n{"question": "?"}\n')
    with pytest.raises(UserError, match='line 2 is neither a string nor an object with an "instruction"'):
        read_prompts_file(path)
    path.write_text("{name} is a placeholder: explain it.\nSay hi.\n")  # text, not JSON: prompts as they are
    if name.endswith(".txt"):
        assert [prompt.instruction for prompt in read_prompts_file(path)] == ["{name} is a placeholder: explain it.",
                                                                               "Say hi."]
    else:
        with pytest.raises(UserError, match="line 1 is not valid JSON"):
            read_prompts_file(path)


# -- outputs: one command's file is never another's ----------------------------------------------------------------
def test_generate_never_replaces_a_compare_report_even_with_overwrite(tmp_path, capsys):
    """``generate --output_file REPORT.md --overwrite`` replaced compare's report (minipeft's file, of another
    command): a single-file output replaces only a file written as the same output."""
    from minipeft.files.manifest import sidecar_of
    from minipeft.files.safe_files import write_output_file

    report = write_output_file(tmp_path / "REPORT.md", "<!-- Written by `python -m minipeft compare` -->\n",
                               "--report")
    assert json.loads(sidecar_of(report).read_text())["as"] == "--report"
    before = digests(tmp_path)
    code, _, err = in_process(GENERATE, "--prompt", "Hi", "--max_new_tokens", "2", "--output_file", report,
                              "--overwrite", capsys=capsys)
    one_error(code, err, f"--output_file {report}: already exists and minipeft wrote it as --report")
    assert digests(tmp_path) == before
    answers = tmp_path / "answers.jsonl"  # its own output: replaced with --overwrite, as before
    for _ in range(2):
        code, _, err = in_process(GENERATE, "--prompt", "Hi", "--max_new_tokens", "2", "--output_file", answers,
                                  "--overwrite", "--device", "cpu", capsys=capsys)
        assert code == 0, err


# -- a run in a user's own folder ----------------------------------------------------------------------------------
def test_a_run_in_a_users_folder_can_be_overwritten_and_the_users_files_stay(tmp_path, capsys):
    """A run into a folder of the user's left it unmarked, so ``--overwrite_output_dir`` then refused the run's own
    outputs; the user's files must stay untouched either way, and nothing may take the folder for minipeft's."""
    from test_faults import MERGE

    folder = tmp_path / "experiments"
    folder.mkdir()
    data = write_records(folder / "data.json", records(12))  # the user's data and notes live there
    (folder / "notes.txt").write_text("my notes\n")
    mine = digests(data, folder / "notes.txt")
    assert train("--dataset_path", data, "--no_cache", "--output_dir", folder, capsys=capsys)[0] == 0
    code, _, err = train("--dataset_path", data, "--no_cache", "--output_dir", folder, capsys=capsys)
    one_error(code, err, "holds checkpoints of an earlier run")
    code, _, err = train("--dataset_path", data, "--no_cache", "--output_dir", folder, "--overwrite_output_dir",
                         capsys=capsys)
    assert code == 0, err
    assert digests(data, folder / "notes.txt") == mine and (folder / "adapter").is_dir()
    code, _, err = in_process(MERGE, "--adapter", folder / "adapter", "--out", folder, "--overwrite", capsys=capsys)
    one_error(code, err, f"--out {folder}")  # the folder holds the user's files: never replaced whole
    assert digests(data, folder / "notes.txt") == mine


def test_a_users_own_file_of_a_runs_name_is_named_as_theirs(tmp_path, capsys):
    """The user's ``metrics.jsonl`` was called "an earlier run's outputs", with advice to overwrite it."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"my": "numbers"}\n')
    before = digests(folder)
    code, _, err = train("--no_cache", "--output_dir", folder, "--overwrite_output_dir", capsys=capsys)
    line = one_error(code, err, f"--output_dir {folder}: holds metrics.jsonl, which minipeft did not write")
    assert "earlier run" not in line and digests(folder) == before
    assert sorted(path.name for path in folder.iterdir()) == ["metrics.jsonl"]  # no marker left behind


# -- resume ----------------------------------------------------------------------------------------------------------
def test_a_resume_with_another_length_says_the_schedule_changes(tmp_path, capsys):
    """``--resume latest --max_steps 12`` after a 7-step cosine run re-planned the schedule without a word."""
    data = write_records(tmp_path / "data.json", records(12))
    out = tmp_path / "out"
    code, _, err = train("--dataset_path", data, "--no_cache", "--batch_size", "4", "--max_steps", "2",
                         "--output_dir", out, capsys=capsys)
    assert code == 0, err
    from minipeft.cli.train import main as train_main

    code, stdout, err = in_process(train_main, "--output_dir", out, "--resume", "latest", "--max_steps", "3",
                                   capsys=capsys)
    assert code == 0, err
    assert ("note: resuming with --max_steps 3 (was 2): the cosine learning-rate schedule is planned over the new "
            "length") in stdout


# -- checks before loading -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, fragment", [
    (["--lora_alpha", "0"], "--lora_alpha must be positive"),
    (["--target_modules", " , "], "--target_modules ' , ': names no module"),
    (["--layers_to_transform", "99"], "--layers_to_transform: layer 99 is out of range; this model has 4 layers"),
    (["--eval_max_batches", "2"], "--eval_max_batches needs a validation set, and this run has none (--val_size 0)"),
])
def test_method_flags_are_checked_before_the_model_loads(flags, fragment, tmp_path, capsys):
    """Each was refused only after the weights loaded, below transformers' progress bar."""
    code, out, err = train(*flags, "--no_cache", "--output_dir", tmp_path / "out", capsys=capsys)
    one_error(code, err, fragment)
    assert "Loading" not in err and out == "" and not (tmp_path / "out").exists()


def test_a_split_without_validation_records_is_named_as_such(tmp_path, capsys):
    """"(--val_size 0)" was said to a user who gave --val_size 0.5 of one record."""
    data = write_records(tmp_path / "data.json", records(1))
    from minipeft.cli.train import main as train_main

    code, _, err = in_process(train_main, "--dataset_path", data, "--val_size", "0.5", "--eval_max_batches", "1",
                              "--max_steps", "1", "--no_cache", "--output_dir", tmp_path / "out", capsys=capsys)
    one_error(code, err, "--eval_max_batches needs a validation set, and this run has none (--val_size 0.5 of 1 "
                         "record)")


def test_module_help_without_a_command_is_a_usage_error(capsys):
    from minipeft.cli import main as cli_main

    assert cli_main([]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: no command given: one of modify, train, data")


def test_a_path_is_not_read_as_a_folder_only_for_files(tmp_path):
    """``file_name`` refuses a trailing '/' (``builtin-data DIR/`` wrote a file named DIR)."""
    import argparse

    from minipeft.core.bounds import file_name

    assert file_name(str(tmp_path / "a.json")) == str(tmp_path / "a.json")
    with pytest.raises(argparse.ArgumentTypeError, match="ends in '/', a folder"):
        file_name(f"{tmp_path}/")
    assert not Path(f"{tmp_path}/x").exists()


def test_sigterm_during_compares_second_method_keeps_the_first_and_exits_143(tmp_path):
    """SIGTERM while compare trains its second method: exit 143, the first method's row, page and adapter
    stay as written, and the message names what was finished (round three asked for it; no test held it)."""
    import signal
    import subprocess
    import sys

    from test_faults import ROOT, script_env

    out, log = tmp_path / "compare", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:  # (a pipe nobody reads would fill and stop the process)
        process = subprocess.Popen([sys.executable, "-m", "minipeft", "compare", "--methods", "lora,ia3", "--max_steps",
                                    "30", "--max_records", "64", "--output_dir", str(out)], cwd=ROOT,
                                   env={**script_env(), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
        try:
            second = False
            for line in process.stdout:  # the second method's training has begun: its plan line is printed
                second = second or line.startswith("=== ia3")
                if second and line.startswith("Training:"):
                    break
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=300)
        finally:
            process.kill()
    err = log.read_text()
    assert second and process.returncode == 143, err
    assert "Traceback" not in err
    assert f"interrupted while training ia3 (left out of the table); the table and adapters in {out} hold the " \
           "methods finished before it: lora" in err
    table = (out / "comparison.md").read_text()
    assert "| lora |" in table and "| ia3 |" not in table
    assert (out / "lora" / "adapter" / "adapter_config.json").is_file()


# -- found in round five (545 commands at d9557e8) ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["train_config.json", "metrics.json"])
def test_a_resume_never_replaces_a_run_file_the_user_edited(name, tmp_path, capsys):
    """``--resume latest`` rewrote an edited ``train_config.json`` / ``metrics.json``, exit 0 (``--overwrite_output_dir``
    already refused): the resume checks the run's own files before it writes."""
    from minipeft.cli.train import main as train_main

    out = tmp_path / "out"
    data = write_records(tmp_path / "data.json", records(12))
    assert train("--dataset_path", data, "--no_cache", "--max_steps", "2", "--save_every", "1", "--output_dir", out,
                 capsys=capsys)[0] == 0
    (out / name).write_text('{"mine": 1}\n')
    before = digests(out)
    code, _, err = in_process(train_main, "--output_dir", out, "--resume", "latest", "--max_steps", "3",
                              capsys=capsys)
    one_error(code, err, f"--resume {out}: holds {out / name}, which was changed after minipeft wrote it")
    assert digests(out) == before


def test_an_output_inside_another_output_is_refused_or_kept_apart(tmp_path, capsys):
    """``train --output_dir RUN/adapter`` trained into the adapter, and ``merge --out MODEL/inner`` then lost
    ``inner`` when MODEL was replaced with --overwrite (both exit 0)."""
    from test_faults import MERGE

    run_dir = tmp_path / "run"
    assert train("--no_cache", "--output_dir", run_dir, capsys=capsys)[0] == 0
    for part in ("adapter", "checkpoints"):
        code, _, err = train("--no_cache", "--output_dir", run_dir / part, capsys=capsys)
        one_error(code, err, f"--output_dir {run_dir / part}: is part of {run_dir}, an output minipeft wrote")
    model, inner = tmp_path / "merged", tmp_path / "merged" / "inner"
    assert in_process(MERGE, "--adapter", run_dir / "adapter", "--out", model, capsys=capsys)[0] == 0
    assert in_process(MERGE, "--adapter", run_dir / "adapter", "--out", inner, capsys=capsys)[0] == 0
    kept = digests(inner)
    code, _, err = in_process(MERGE, "--adapter", run_dir / "adapter", "--out", model, "--overwrite", capsys=capsys)
    one_error(code, err, f"--out {model}: holds {inner}")
    assert digests(inner) == kept


def test_compare_never_writes_into_a_run_or_a_running_runs_folder(tmp_path, capsys):
    import os
    import socket

    from minipeft.cli import main as cli_main

    run_dir = tmp_path / "run"
    assert train("--no_cache", "--output_dir", run_dir, capsys=capsys)[0] == 0
    before = digests(run_dir)
    compare = lambda out: in_process(lambda argv: cli_main(["compare", *argv]), "--methods", "lora",  # noqa: E731
                                     "--max_steps", "1", "--output_dir", out, "--overwrite", capsys=capsys)
    one_error(*compare(run_dir)[::2], f"--output_dir {run_dir}: holds train_config.json, a training run's")
    (run_dir / ".minipeft.lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process, not us
    one_error(*compare(run_dir / "cmp")[::2], f"--output_dir {run_dir / 'cmp'}: lies in {run_dir}, which another")
    (run_dir / ".minipeft.lock").unlink()
    assert digests(run_dir) == before and not (run_dir / "cmp").exists()


def test_a_tokenizer_json_the_tokenizers_library_refuses_is_one_line(tmp_path, capsys):
    """A vocabulary emptied in a valid ``tokenizer.json``: the tokenizers library raises a bare ``Exception``,
    which came through as a traceback in train, data, generate and modify."""
    from minipeft.cli.data import main as data_main
    from test_faults_round2 import model_copy

    def empty_vocabulary(directory):
        tokenizer = json.loads((directory / "tokenizer.json").read_text())
        tokenizer["model"]["vocab"] = {}
        (directory / "tokenizer.json").write_text(json.dumps(tokenizer))

    model = model_copy(tmp_path, empty_vocabulary)
    code, _, err = in_process(data_main, "--model", model, "--no_cache", "--num_samples", "1", capsys=capsys)
    one_error(code, err, f"--model {model}: the tokenizer (tokenizer.json, tokenizer_config.json) does not load")


def test_a_base_model_named_by_the_adapter_is_blamed_on_its_config_not_on_model(tmp_path, capsys):
    from minipeft.cli.modify import main as modify_main
    from test_faults_round2 import edit_json

    adapter = tmp_path / "adapter"
    assert in_process(modify_main, "--model", "builtin", "--table", "none", "--save_adapter", adapter,
                      capsys=capsys)[0] == 0
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    edit_json(adapter / "adapter_config.json", lambda config: config.update(base_model_name_or_path=str(folder)))
    code, _, err = in_process(GENERATE, "--adapter", adapter, "--prompt", "Hi", "--device", "cpu", capsys=capsys)
    line = one_error(code, err, f"{adapter / 'adapter_config.json'}: \"base_model_name_or_path\" {folder}",
                     "(or pass --model with the base model)")
    assert not line.startswith("error: --model")


@pytest.mark.parametrize("text, fragment", [
    ("[null, null]", "record 0: is a JSON null, expected an object with 'instruction' and 'output'"),
    ('["abc", "abc"]', "record 0: is a JSON string, expected an object"),
])
def test_records_that_are_not_objects_are_named_as_such_not_as_a_missing_column(text, fragment, tmp_path):
    from minipeft.core.errors import UserError
    from minipeft.data.loading import load_records

    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        load_records(path)
    assert fragment in str(error.value) and "--instruction_column" not in str(error.value)


@pytest.mark.parametrize("argv, fragment", [
    (["data", "--model", ""], "argument --model: an empty name"),
    (["train", "--model", ""], "argument --model: an empty name"),
    (["train", "--output_dir", "/"], "--output_dir /: holds minipeft's tokenization cache"),
    (["pretrain", "--output_dir", "{file}", "--max_steps", "1"], "--output_dir {file}: is a file, not a directory"),
    (["modify", "--model", "builtin", "--modification_type", "ia3", "--feedforward_modules", "nonexist"],
     "--feedforward_modules: nonexist not among the target modules ['c_attn', 'mlp.c_proj'] (--target_modules, "
     "or the method's default for the model)"),  # the defaults named as such; the flags as flags (round ten)
])
def test_round_five_messages_name_what_the_user_gave(argv, fragment, tmp_path, capsys):
    from minipeft.cli import main as cli_main

    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine\n")
    argv = [arg.format(file=user_file) for arg in argv]
    try:
        code = cli_main(argv)
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    err = capsys.readouterr().err
    line = one_error(code, err, fragment.format(file=user_file))
    assert "--cache_dir" not in line and "pass --overwrite" not in line and user_file.read_text() == "mine\n"


# -- found in round six (510 commands at 83d4e50) ------------------------------------------------------------------
def test_a_file_the_user_named_inside_a_runs_adapter_survives_the_runs_later_saves(tmp_path, capsys):
    """``compare --report RUN/adapter/r.md`` (or any single-file output) was recorded as part of the adapter, and
    the run's next save of the adapter (a resume) deleted it: such a file stays the user's wherever it lies."""
    from minipeft.cli.train import main as train_main
    from minipeft.files.manifest import foreign_files

    data, out = write_records(tmp_path / "data.json", records(12)), tmp_path / "run"
    assert train("--dataset_path", data, "--no_cache", "--max_steps", "2", "--save_every", "1", "--output_dir", out,
                 capsys=capsys)[0] == 0
    answers = out / "adapter" / "data.json"
    from minipeft.cli.builtin_data import main as builtin_data_main

    code, _, err = in_process(builtin_data_main, answers, capsys=capsys)
    assert code == 0, err
    assert answers in foreign_files(out / "adapter")
    kept = digests(answers)
    code, _, err = in_process(train_main, "--output_dir", out, "--resume", "latest", "--max_steps", "3",
                              capsys=capsys)
    assert code == 0, err
    assert digests(answers) == kept


def test_a_csv_quote_never_closed_is_refused_naming_the_line(tmp_path):
    """It took the rest of the file into one cell: "Skipped 1 of 95 records", rows 96-100 gone unmentioned."""
    from minipeft.core.errors import UserError
    from minipeft.data.loading import load_records

    path = tmp_path / "data.csv"
    path.write_text("instruction,output\n" + "".join(f"Say {i},{i}\n" for i in range(5)) + '"Say x,x\nSay y,y\n')
    with pytest.raises(UserError, match=r"data.csv: not a readable CSV file \(line 8: unexpected end of data\)"):
        load_records(path)


def test_a_warmup_the_user_did_not_give_is_not_named_as_a_flag(tmp_path, capsys):
    """compare's own warmup (a ratio of 0.1) was named "--warmup_steps 1", a flag compare does not have."""
    from minipeft.cli import main as cli_main

    code, out, err = in_process(lambda argv: cli_main(["compare", *argv]), "--methods", "lora", "--max_steps", "1",
                                "--max_records", "16", "--output_dir", tmp_path / "cmp", capsys=capsys)
    assert code == 0, err
    assert "note: the warmup of 1 step (warmup ratio 0.1) is not shorter than the run's 1 steps" in out + err
    assert "--warmup_steps" not in out + err and "--learning_rate" not in out + err


def test_plain_prompts_that_start_with_a_bracket_are_prompts(tmp_path):
    """``[1] What is ...`` in a ``.txt`` file was refused as broken JSON; in a ``.json`` file it still is."""
    from minipeft.core.errors import UserError
    from minipeft.inference.prompts import read_prompts_file

    text = "[1] What is the capital of Peru?\n[2] Say hi.\n"
    (tmp_path / "prompts.txt").write_text(text)
    assert [prompt.instruction for prompt in read_prompts_file(tmp_path / "prompts.txt")] == text.splitlines()
    (tmp_path / "prompts.json").write_text(text)
    with pytest.raises(UserError, match="prompts.json: not valid JSON"):
        read_prompts_file(tmp_path / "prompts.json")


def test_an_empty_resume_name_and_an_incomplete_latest_checkpoint_are_said(tmp_path, capsys):
    """``--resume ''`` trained from scratch as if it were absent; a newest checkpoint that lost its
    trainer_state.json was passed over in silence."""
    from minipeft.cli.train import main as train_main

    data, out = write_records(tmp_path / "data.json", records(12)), tmp_path / "run"
    code, _, err = train("--dataset_path", data, "--no_cache", "--output_dir", out, "--resume", "", capsys=capsys)
    one_error(code, err, "--resume '': an empty name")
    assert not out.exists()
    assert train("--dataset_path", data, "--no_cache", "--max_steps", "2", "--save_every", "1", "--output_dir", out,
                 capsys=capsys)[0] == 0
    (out / "checkpoints" / "step-2" / "trainer_state.json").unlink()
    code, stdout, err = in_process(train_main, "--output_dir", out, "--resume", "latest", "--max_steps", "3",
                                   capsys=capsys)
    assert code == 0, err
    assert f"note: --resume latest: {out / 'checkpoints' / 'step-2'} has no trainer_state.json (incomplete); " \
           f"resuming from {out / 'checkpoints' / 'step-1'}" in err
