"""Fault injection, round three (issue #26): a fresh adversarial round of ~500 commands against every subcommand.

Each case is one misbehaviour the round found, reduced to the smallest command that showed it, and asserts what
the user sees (exit status, exactly one ``error:`` line naming the file, record or flag, no traceback) and what
is left on disk. The helpers come from ``tests/test_faults.py``; every case runs through
:func:`minipeft.cli.run`, as the scripts do.
"""

from pathlib import Path

import pytest
import torch
from test_faults import GENERATE, MERGE, builtin_model_available, digests, in_process, one_error
from test_faults_round2 import checkpointed_run  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not builtin_model_available(), reason="the built-in model is not built")


# -- generation past the model's positions -------------------------------------------------------------------------
def test_a_prompt_longer_than_the_models_positions_is_refused(capsys):
    code, _, err = in_process(GENERATE, "--prompt", "word " * 600, "--max_new_tokens", "3", "--device", "cpu",
                              "--no_stream", capsys=capsys)  # was an IndexError in GPT-2's position embedding
    one_error(code, err, "prompt 1 is", "more than the model's 512 positions: shorten it")


def test_new_tokens_past_the_models_positions_are_cut_to_them_and_said(capsys):
    code, out, err = in_process(GENERATE, "--prompt", "word " * 470, "--max_new_tokens", "600", "--device", "cpu",
                                "--no_stream", capsys=capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "note: prompt 1 is" in err and "new tokens fit the model's 512 positions (not 600)" in err


# -- messages name the real culprit ---------------------------------------------------------------------------------
def test_merging_an_unmergeable_adapter_names_its_config_not_a_flag_never_given(tmp_path, capsys):
    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / "prefix"
    code, _, err = in_process(modify_main, "--model", "builtin", "--modification_type", "prefix", "--table", "none",
                              "--save_adapter", adapter, capsys=capsys)
    assert code == 0, err
    code, out, err = in_process(MERGE, "--adapter", adapter, "--out", tmp_path / "merged", capsys=capsys)
    line = one_error(code, err, f"--adapter {adapter / 'adapter_config.json'}: a prefix adapter cannot be merged")
    assert "--modification_type" not in line
    assert "Loaded" not in out and not (tmp_path / "merged").exists()  # refused before loading the model


# -- bounds on every integer ----------------------------------------------------------------------------------------
def test_a_corpus_larger_than_the_memory_is_refused_before_generating_it(tmp_path, capsys):
    from minipeft.cli.pretrain import main as pretrain_main

    code, _, err = in_process(pretrain_main, "--num_documents", 10 ** 12, "--output_dir", tmp_path / "model",
                              capsys=capsys)  # it generated strings until the machine ran out of memory
    one_error(code, err, "--num_documents 1000000000000: the corpus needs", "more than this machine's")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("kind, fragment", [("file", "is a file"),
                                            ("model", "already holds a model (config.json), not an adapter")])
def test_save_adapter_onto_a_file_or_a_model_folder_says_what_is_there(kind, fragment, tmp_path, capsys):
    from minipeft.cli.modify import main as modify_main

    target = tmp_path / "target"
    if kind == "file":
        target.write_text("my notes\n")
    else:  # a user's model folder: it was called "a trained adapter"
        target.mkdir()
        (target / "config.json").write_text("{}")
    before = digests(target)
    code, _, err = in_process(modify_main, "--model", "builtin", "--table", "none", "--save_adapter", target,
                              capsys=capsys)
    line = one_error(code, err, f"--save_adapter {target}: {fragment}")
    assert "trained adapter" not in line and digests(target) == before


# -- nothing a user had is lost: outputs apart from inputs ----------------------------------------------------------
def test_save_adapter_inside_the_model_folder_even_through_a_link_is_refused(tmp_path, capsys):
    import shutil

    from minipeft.builtin import MODEL_DIR
    from minipeft.cli.modify import main as modify_main

    model = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    (tmp_path / "link").symlink_to(model)
    before = digests(model)
    code, _, err = in_process(modify_main, "--model", tmp_path / "link", "--table", "none", "--save_adapter",
                              model / "adapter", capsys=capsys)  # it wrote model/adapter/ inside the input
    one_error(code, err, f"--save_adapter {model / 'adapter'}: lies inside --model {tmp_path / 'link'}")
    assert digests(model) == before and not (model / "adapter").exists()


# -- models users bring are checked ---------------------------------------------------------------------------------
def test_a_config_whose_heads_do_not_divide_its_width_is_one_line_naming_it(tmp_path, capsys):
    import json

    from minipeft.cli.train import main as train_main
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, num_attention_heads=3)))
    code, _, err = in_process(train_main, "--model", model, "--output_dir", tmp_path / "out", "--max_steps", "1",
                              "--no_cache", capsys=capsys)  # was huggingface_hub's StrictDataclassClassValidationError
    one_error(code, err, f"--model {model / 'config.json'}: The hidden size (32) is not a multiple of the number "
                         "of attention heads (3)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["more layers in config.json", "a tensor missing from the file"])
def test_a_model_whose_weights_lack_parameters_is_refused_not_filled_at_random(damage, tmp_path, capsys):
    import json

    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from minipeft.cli.train import main as train_main

    model = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(model)
    if damage == "more layers in config.json":  # transformers started layer 1 at random: "Trained 1 steps", exit 0
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
        fragment = "model.layers.1."
    else:
        tensors = load_file(model / "model.safetensors")
        del tensors["model.layers.0.self_attn.q_proj.weight"]
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
        fragment = "model.layers.0.self_attn.q_proj.weight"
    code, out, err = in_process(train_main, "--model", model, "--output_dir", tmp_path / "out", "--max_steps", "1",
                                "--no_cache", capsys=capsys)
    one_error(code, err, f"--model {model}: config.json describes", "the weights lack", fragment)
    assert "Trained" not in out and not (tmp_path / "out" / "adapter").exists()


def test_an_unknown_activation_in_config_json_names_the_field(tmp_path, capsys):
    import json
    import shutil

    from minipeft.builtin import MODEL_DIR
    from minipeft.cli.train import main as train_main

    model = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, activation_function="relu6x")))
    code, _, err = in_process(train_main, "--model", model, "--output_dir", tmp_path / "out", "--max_steps", "1",
                              "--no_cache", capsys=capsys)  # was KeyError: 'relu6x' from transformers' ACT2FN
    one_error(code, err, f"--model {model / 'config.json'}: \"activation_function\" is 'relu6x', which transformers "
                         "does not know")


@pytest.mark.parametrize("method, change, fragment", [
    ("ia3", {"target_modules": ["ln_1"], "feedforward_modules": []}, "target_modules: transformer.h.0.ln_1 is a"),
    ("prefix", {"token_dim": 999}, "token_dim is 999"),
])
def test_an_adapter_config_that_does_not_fit_the_model_names_the_file_not_a_flag(method, change, fragment, tmp_path,
                                                                                    capsys):
    import json

    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / method
    code, _, err = in_process(modify_main, "--model", "builtin", "--modification_type", method, "--table", "none",
                              "--save_adapter", adapter, capsys=capsys)
    assert code == 0, err
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, **change)))
    code, _, err = in_process(GENERATE, "--adapter", adapter, "--prompt", "hi", "--max_new_tokens", "2", "--device",
                              "cpu", capsys=capsys)
    line = one_error(code, err, f"{adapter / 'adapter_config.json'}: ", fragment)
    assert "--target_modules" not in line


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_a_base_model_recorded_in_the_adapter_and_gone_names_the_adapter_not_model(command, tmp_path, capsys):
    import json

    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / "adapter"
    code, _, err = in_process(modify_main, "--model", "builtin", "--table", "none", "--save_adapter", adapter,
                              capsys=capsys)
    assert code == 0, err
    config = json.loads((adapter / "adapter_config.json").read_text())
    gone = str(tmp_path / "moved-away-model")
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=gone)))
    argv = (["--prompt", "hi", "--device", "cpu"] if command == "generate" else ["--out", tmp_path / "merged"])
    code, _, err = in_process(GENERATE if command == "generate" else MERGE, "--adapter", adapter, *argv,
                              capsys=capsys)  # it said "--model ...: no such directory", a flag never given
    one_error(code, err, f"--adapter {adapter}: its adapter_config.json names the base model {gone}",
              "pass --model")


@pytest.mark.parametrize("change, fragment", [
    (lambda config: config.update(base_model_name_or_path=5), '"base_model_name_or_path" must be a model name'),
    (lambda config: config["minipeft"].update(template="nope"), "\"minipeft.template\" is 'nope', not a template"),
    (lambda config: config["minipeft"].update(quantization={"quantize": "nf9"}), '"minipeft.quantization" is'),
    (lambda config: config["minipeft"].update(quantization=[1]), '"minipeft.quantization" is [1]'),
])
def test_minipefts_own_fields_in_adapter_config_of_the_wrong_value_name_the_file(change, fragment, tmp_path, capsys):
    import json

    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / "adapter"
    code, _, err = in_process(modify_main, "--model", "builtin", "--table", "none", "--save_adapter", adapter,
                              capsys=capsys)
    assert code == 0, err
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.setdefault("minipeft", {})
    change(config)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = in_process(GENERATE, "--adapter", adapter, "--prompt", "hi", "--max_new_tokens", "2", "--device",
                              "cpu", capsys=capsys)  # a TypeError traceback, or "--template nope", "--quantize 'nf9'"
    line = one_error(code, err, "adapter_config.json: ", fragment)
    assert "--template nope" not in line and "--quantize 'nf9'" not in line


# -- bounds on every parse: tiny floats ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--temperature", "1e-300"), ("--top_p", "1e-300")])
def test_a_tiny_temperature_or_top_p_samples_the_likeliest_token(flag, value, capsys):
    # 1e-300 is 0 in float32: logits / 0 was NaN, or every token dropped; multinomial raised a RuntimeError
    code, out, err = in_process(GENERATE, "--prompt", "Name a color.", "--max_new_tokens", "4", "--device", "cpu",
                                "--no_stream", capsys=capsys)
    assert code == 0, err
    code, sampled, err = in_process(GENERATE, "--prompt", "Name a color.", "--max_new_tokens", "4", "--device", "cpu",
                                    "--no_stream", "--do_sample", "--seed", "1", flag, value, capsys=capsys)
    assert code == 0 and "Traceback" not in err, err
    assert sampled == out  # the greedy reply: only the likeliest token is left to sample


@pytest.mark.parametrize("command", [GENERATE, MERGE])
def test_an_empty_adapter_name_is_refused_as_such(command, tmp_path, capsys):
    argv = ["--prompt", "hi"] if command is GENERATE else ["--out", tmp_path / "merged"]
    try:
        code = command(["--adapter", "", *map(str, argv)])  # it read "." as the adapter
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    one_error(code, capsys.readouterr().err, "argument --adapter: an empty name")


@pytest.mark.parametrize("index_text, fragment", [
    ('{"weight_map": 5}', "not a safetensors index"),  # AttributeError: 'int' object has no attribute 'values'
    ("[" * 100000, "not valid JSON (nested deeper than"),  # RecursionError
    (None, "names the shard '../elsewhere.safetensors', which is not a file of"),  # read a file outside the model
])
def test_a_damaged_shard_index_is_one_line_naming_it(index_text, fragment, tmp_path, capsys):
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from minipeft.cli.train import main as train_main

    model = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(
        model, max_shard_size="20KB")
    index = model / "model.safetensors.index.json"
    if index_text is None:
        values = json.loads(index.read_text())
        values["weight_map"][next(iter(values["weight_map"]))] = "../elsewhere.safetensors"
        index_text = json.dumps(values)
    index.write_text(index_text)
    code, _, err = in_process(train_main, "--model", model, "--output_dir", tmp_path / "out", "--max_steps", "1",
                              "--no_cache", capsys=capsys)
    one_error(code, err, f"--model {index}: ", fragment)


def test_a_damaged_pytorch_bin_checkpoint_is_one_line_naming_the_model(tmp_path, capsys):
    import shutil

    from minipeft.builtin import MODEL_DIR
    from minipeft.cli.train import main as train_main

    model = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a zip archive")
    code, _, err = in_process(train_main, "--model", model, "--output_dir", tmp_path / "out", "--max_steps", "1",
                              "--no_cache", capsys=capsys)  # was "RuntimeError: PytorchStreamReader failed ..."
    one_error(code, err, f"--model {model}: its weights cannot be read", "the checkpoint is damaged")


def test_an_integer_weight_where_the_model_computes_in_floats_is_refused(tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from minipeft.builtin import MODEL_DIR
    from minipeft.cli.train import main as train_main

    model = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    tensors = load_file(model / "model.safetensors")
    name = next(key for key in tensors if key.endswith("attn.c_attn.weight"))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    code, _, err = in_process(train_main, "--model", model, "--output_dir", tmp_path / "out", "--max_steps", "1",
                              "--no_cache", capsys=capsys)  # was a dtype RuntimeError in the first matmul
    one_error(code, err, "is stored as int32, but the model computes it in floating point")


def test_a_chat_template_that_fails_is_one_line_in_generate(tmp_path, capsys):
    import json
    import shutil

    from minipeft.builtin import MODEL_DIR

    model = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = '{{ raise_exception("no system prompt allowed") }}'
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = in_process(GENERATE, "--model", model, "--prompt", "hi", "--max_new_tokens", "2", "--device",
                              "cpu", capsys=capsys)  # was jinja2.exceptions.TemplateError, a traceback
    one_error(code, err, "its chat_template (tokenizer_config.json) fails: no system prompt allowed",
              "--template alpaca")


def test_modify_refuses_a_model_folder_too_large_for_the_memory_before_building_it(tmp_path, capsys):
    import json
    import shutil

    from minipeft.builtin import MODEL_DIR
    from minipeft.cli.modify import main as modify_main

    model = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, n_embd=10 ** 6, n_layer=1000)))
    code, _, err = in_process(modify_main, "--model", model, "--table", "none",
                              capsys=capsys)  # it built the model for real: killed by the OOM killer
    one_error(code, err, f"--model {model / 'config.json'}: describes a model of at least", "more than the")


def test_every_loader_names_a_config_that_transformers_refuses(tmp_path):
    import json
    import shutil

    from minipeft.builtin import MODEL_DIR
    from minipeft.core.errors import UserError
    from minipeft.loading.models import load_model_and_tokenizer

    model = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    for change, fragment in [({"n_head": 3}, "config.json: `embed_dim` must be divisible by num_heads"),
                             ({"activation_function": "relu6x"}, "\"activation_function\" is 'relu6x'")]:
        (model / "config.json").write_text(json.dumps(dict(config, **change)))
        with pytest.raises(UserError, match=fragment):  # compare's loader: tracebacks from transformers
            load_model_and_tokenizer(str(model))


def test_data_pipeline_names_a_tokenizer_that_does_not_load(tmp_path, capsys):
    import shutil

    from minipeft.builtin import MODEL_DIR
    from minipeft.cli.data import main as data_main

    model = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    (model / "tokenizer.json").write_text("{}")
    code, _, err = in_process(data_main, "--model", model, "--num_samples", "1", "--no_cache",
                              capsys=capsys)  # was KeyError: 'added_tokens'
    one_error(code, err, f"--model {model}: the tokenizer (tokenizer.json, tokenizer_config.json) does not load")


@pytest.mark.parametrize("flags, fragment", [
    (["--modification_type", "adapter", "--adapter_size", "1000000000"], "--adapter_size 1000000000: 8 bottleneck"),
    (["--modification_type", "prefix", "--prefix_projection", "--prefix_hidden_size", "1000000000"],
     "--prefix_hidden_size 1000000000: the prefix MLP"),
])
def test_method_sizes_beyond_the_memory_are_refused_before_allocating(flags, fragment, tmp_path, capsys):
    from minipeft.cli.train import main as train_main

    code, _, err = in_process(train_main, *flags, "--output_dir", tmp_path / "out", "--max_steps", "1", "--no_cache",
                              capsys=capsys)  # was "DefaultCPUAllocator: can't allocate memory" (640 GB), a traceback
    one_error(code, err, fragment, "more than this machine's")


@pytest.mark.parametrize("flags, fragment", [
    (["--target_modules", "re:["], "--target_modules 're:[': not a regular expression"),  # re.error traceback
    (["--modification_type", "selective", "--freeze_layers", "0-99999999999999999999"],
     "--freeze_layers: layer 4 is out of range; this model has 4 layers"),  # an OverflowError traceback
])
def test_a_bad_regex_or_an_endless_layer_range_is_one_line(flags, fragment, tmp_path, capsys):
    from minipeft.cli.train import main as train_main

    code, _, err = in_process(train_main, *flags, "--output_dir", tmp_path / "out", "--max_steps", "1", "--no_cache",
                              capsys=capsys)
    one_error(code, err, fragment)


def test_a_bad_regex_in_an_adapter_config_names_the_file(tmp_path, capsys):
    import json

    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / "adapter"
    assert in_process(modify_main, "--model", "builtin", "--table", "none", "--save_adapter", adapter,
                      capsys=capsys)[0] == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, target_modules="(unclosed")))
    code, _, err = in_process(GENERATE, "--adapter", adapter, "--prompt", "hi", "--device", "cpu", capsys=capsys)
    one_error(code, err, "adapter_config.json: ", "'(unclosed': not a regular expression")


# -- found in round three, fixed after it -----------------------------------------------------------------------------
def test_a_cache_inside_the_run_folder_is_refused_before_training(tmp_path, capsys):
    from minipeft.cli.train import main as train_main

    out = tmp_path / "out"
    for cache in (out, out / "adapter"):  # the cache's files made the adapter's folder foreign: the final save failed
        code, _, err = in_process(train_main, "--max_steps", "1", "--cache_dir", cache, "--output_dir", out,
                                  capsys=capsys)
        one_error(code, err, f"--cache_dir {cache}: lies inside --output_dir {out}")
        assert not out.exists()


def test_virtual_tokens_and_a_record_as_long_as_the_model_train(tmp_path, capsys):
    import json

    from minipeft.cli.train import main as train_main

    data = tmp_path / "long.json"  # records past the built-in model's 512 positions, 20 virtual tokens before them
    data.write_text(json.dumps([{"instruction": "Repeat: " + " ".join(f"word{i}" for i in range(400)),
                                 "input": "", "output": "ok " * 200}] * 4))
    code, out, err = in_process(train_main, "--dataset_path", data, "--modification_type", "prompt",
                                "--max_length", "512", "--max_steps", "1", "--batch_size", "2", "--val_size", "0",
                                "--no_cache", "--output_dir", tmp_path / "out", capsys=capsys)
    assert code == 0 and "Traceback" not in err, err  # an IndexError in the position embedding
    assert "less the method's 20 virtual tokens; records are cut at 492" in out + err


@pytest.mark.parametrize("change, fragment", [
    (lambda state: state.update(data=None), '"data" must be an object (the data fingerprint), got None'),
    (lambda state: state.update(rng=[]), '"rng" must be one object of generator scalars per process'),
    (lambda state: state["data"].update(max_length=-5), '"data.max_length" must be a positive integer, got -5'),
    (lambda state: state["optimizer"]["param_groups"][0].update(params=[0, 0]),
     '"optimizer.param_groups" must be groups holding each of the'),
    (lambda state: state["trainer"].update(nonfinite_in_a_row=10 ** 9), '"nonfinite_in_a_row" must be at most "step"'),
    (lambda state: state["trainer"].update(epoch_target_tokens=0, epoch_nll=3.5),
     '"epoch_target_tokens" is 0 with a summed loss'),
    (lambda state: state["trainer"].update(step=3), '"step" is 3, but its folder is step 2'),
])
def test_a_checkpoint_state_that_no_run_wrote_is_refused(change, fragment, checkpointed_run, tmp_path, capsys):
    """Each was accepted and the run continued (exit 0) from a state no run could have saved."""
    from test_faults_round2 import edit_json, resume_copy

    copy, resume = resume_copy(checkpointed_run, tmp_path, capsys)
    edit_json(copy / "checkpoints" / "step-2" / "trainer_state.json", change)
    before = digests(copy)
    code, out, err = resume()
    one_error(code, err, "trainer_state.json", fragment)
    assert digests(copy) == before and "Trained" not in out


@pytest.mark.parametrize("flag, value", [("--max_records", "12"), ("--packing", None)])
def test_a_resume_with_other_data_settings_is_refused(flag, value, checkpointed_run, tmp_path, capsys):
    """``--max_records`` picks other records into the same batch positions, ``--packing`` cuts other batches
    (round four): both were accepted (exit 0), packing with a note."""
    from test_faults_round2 import resume_copy

    copy, resume = resume_copy(checkpointed_run, tmp_path, capsys, flag, *([value] if value else []))
    before = digests(copy)
    code, _, err = resume()
    one_error(code, err, f"--{flag.lstrip('-')}", "resume_new_data")
    assert digests(copy) == before


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_lock_name_that_is_not_a_lock_file_is_one_line(kind, tmp_path, capsys):
    """A directory named ``.minipeft.lock`` ended in IsADirectoryError; a FIFO would have blocked the read."""
    import os

    from minipeft.cli.train import main as train_main

    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".minipeft.lock"
    lock.mkdir() if kind == "directory" else os.mkfifo(lock)
    code, _, err = in_process(train_main, "--max_steps", "1", "--no_cache", "--output_dir", out, capsys=capsys)
    one_error(code, err, f"{lock} is not a lock file minipeft wrote")
    assert sorted(path.name for path in out.iterdir()) == [".minipeft.lock"]


def test_a_warmup_longer_than_the_run_is_said(tmp_path, capsys):
    """``--warmup_steps 1000000000`` trained at a learning rate a billion times smaller than asked, silently."""
    from minipeft.cli.train import main as train_main

    code, out, err = in_process(train_main, "--max_steps", "2", "--val_size", "0", "--no_cache", "--learning_rate",
                                "1e-3", "--warmup_steps", "1000000000", "--output_dir", tmp_path / "out", capsys=capsys)
    assert code == 0, err
    assert ("note: --warmup_steps 1,000,000,000 is not shorter than the run's 2 steps: the learning rate never "
            "reaches its peak 0.001 (it ends at 2e-12)") in out + err


# -- every writing command honours the run lock ---------------------------------------------------------------------
def test_a_new_run_inside_another_running_runs_folder_is_refused(tmp_path, capsys):
    """It trained and wrote into the other run's folder. A lock this process holds is no obstacle: compare
    trains each method into a folder of the --output_dir it holds (tests/test_compare.py)."""
    import os
    import socket

    from minipeft.cli.train import main as train_main

    outer = tmp_path / "running"
    outer.mkdir()
    (outer / ".minipeft.lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process, not us
    code, _, err = in_process(train_main, "--output_dir", outer / "inner", "--max_steps", "1", "--no_cache",
                              capsys=capsys)
    one_error(code, err, f"--output_dir {outer / 'inner'}: lies in {outer}, which another minipeft process")
    assert not (outer / "inner").exists()


# -- found in round four -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["merge", "pretrain"])
def test_overwrite_never_replaces_a_training_run_or_its_checkpoints_with_a_model(command, checkpointed_run,
                                                                                  tmp_path, capsys):
    """``merge --out RUN --overwrite`` (and pretrain's) replaced a run, its checkpoints and best adapter included,
    with a merged model, exit 0: a directory written whole replaces only a model folder."""
    from minipeft.cli import main as cli_main
    from test_faults_round2 import resume_copy

    copy, _ = resume_copy(checkpointed_run, tmp_path, capsys)
    before = digests(copy)
    for target, what in ((copy, "is not a model folder (it holds train_config.json, a training run's"),
                         (copy / "checkpoints", f"is part of {copy}, an output minipeft wrote")):
        argv = (["merge", "--adapter", str(checkpointed_run[0] / "adapter"), "--out", str(target)] if command == "merge"
                else ["pretrain", "--max_steps", "1", "--num_documents", "100", "--output_dir", str(target)])
        code, _, err = in_process(lambda args: cli_main([*argv, *args]), "--overwrite", capsys=capsys)
        one_error(code, err, f"{target}: {what}")
    assert digests(copy) == before


@pytest.mark.parametrize("command", [GENERATE, MERGE])
@pytest.mark.parametrize("block", ["hello", 5, [["template", "alpaca"]]])
def test_a_minipeft_block_that_is_not_an_object_names_the_file(command, block, tmp_path, capsys):
    """``"minipeft": "hello"`` was a ValueError traceback in generate, ``5`` a TypeError in merge; a list of
    pairs was taken for an object."""
    import json

    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / "adapter"
    assert in_process(modify_main, "--model", "builtin", "--table", "none", "--save_adapter", adapter,
                      capsys=capsys)[0] == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, minipeft=block)))
    extra = ["--prompt", "hi", "--device", "cpu"] if command is GENERATE else ["--out", str(tmp_path / "merged")]
    code, _, err = in_process(command, "--adapter", adapter, *extra, capsys=capsys)
    one_error(code, err, "adapter_config.json: \"minipeft\" must be a JSON object")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("command", ["data", "merge", "compare"])
def test_a_model_folder_without_a_tokenizer_is_refused_by_every_command(command, tmp_path, capsys):
    """data_pipeline turned every record into one EOS (exit 0); merge and compare ended in tracebacks, compare
    leaving its records.json behind (train and generate already said so)."""
    from minipeft.cli import main as cli_main
    from test_faults_round2 import model_copy

    def no_tokenizer(directory):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (directory / name).unlink()

    model = model_copy(tmp_path, no_tokenizer)
    adapter = tmp_path / "adapter"  # an adapter of that model (modify needs no tokenizer)
    assert in_process(lambda argv: cli_main(["modify", *argv]), "--model", model, "--table", "none",
                      "--save_adapter", adapter, capsys=capsys)[0] == 0
    out = tmp_path / "out"
    argv = {"data": ["data", "--model", str(model), "--no_cache", "--num_samples", "1"],
            "merge": ["merge", "--model", str(model), "--adapter", str(adapter), "--out", str(out)],
            "compare": ["compare", "--model", str(model), "--methods", "lora", "--max_steps", "1", "--max_records",
                        "40", "--output_dir", str(out)]}[command]
    code, _, err = in_process(lambda extra: cli_main([*argv, *extra]), capsys=capsys)
    one_error(code, err, f"--model {model}: has no tokenizer")
    assert not out.exists() or not [path for path in out.iterdir() if not path.name.startswith(".minipeft")]


def test_an_accumulation_longer_than_the_epoch_is_said(tmp_path, capsys):
    """``--gradient_accumulation_steps 100000000`` trained (exit 0) reporting 200,000,000 records a step, from
    an epoch of 5 micro-batches, without a word (a window longer than the epoch is allowed: resume handles it)."""
    import json

    from minipeft.cli.train import main as train_main

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(10)]))
    code, out, err = in_process(train_main, "--dataset_path", data, "--val_size", "0", "--batch_size", "2",
                                "--gradient_accumulation_steps", "100000000", "--max_steps", "1", "--no_cache",
                                "--output_dir", tmp_path / "out", capsys=capsys)
    assert code == 0, err
    assert ("note: --gradient_accumulation_steps 100,000,000 is more than the 5 micro-batches of an epoch: each "
            "optimizer step takes the epoch's 5") in out + err


def test_an_empty_prompts_file_name_is_a_usage_error(capsys):
    """``--prompts_file ''`` was read as ".", the current folder, and called a directory."""
    with pytest.raises(SystemExit) as exit_info:
        in_process(GENERATE, "--prompts_file", "", "--max_new_tokens", "2", capsys=capsys)
    assert exit_info.value.code == 2
    assert "argument --prompts_file: an empty name" in capsys.readouterr().err
