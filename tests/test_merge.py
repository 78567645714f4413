"""Merged export: the directory loads in plain transformers and matches base + adapter within 1e-4 (float32)
for LoRA, DoRA and IA3 on both families; tied embeddings kept tied or untied (and said); non-mergeable methods
stop with one line and exit 2; nothing half-written."""

import json
import pytest
import torch
from transformers import AutoModelForCausalLM

from minipeft import load_adapter
from minipeft.cli import main as cli_main
from minipeft.inference.merge import MERGE_INFO_NAME, max_logit_difference, sample_batch
from minipeft.cli.merge import main as merge_main
from minipeft.loading.models import load_model_and_tokenizer
from serving_fixtures import make_tokenizer, save_adapter_for, save_model_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer()
    return {family: save_model_dir(family, root / family, tokenizer) for family in ("gpt2", "llama")}


def unmerged_and_reloaded(model_dir, adapter_dir, out_dir):
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    peft_model = load_adapter(model, adapter_dir).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    return peft_model, reloaded, sample_batch(tokenizer, "plain")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_export_loads_in_transformers_and_matches(model_dirs, family, method, tmp_path, capsys):
    adapter = save_adapter_for(model_dirs[family], method, family, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(adapter), "--out", str(out)]) == 0  # --model from the adapter's config
    printed = capsys.readouterr().out
    assert "check: max |logit(merged) - logit(base + adapter)|" in printed and "reloaded from disk" in printed
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MERGE_INFO_NAME} <= {
        path.name for path in out.iterdir()}
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())  # no temporary directory left
    peft_model, reloaded, batch = unmerged_and_reloaded(model_dirs[family], adapter, out)
    assert max_logit_difference(peft_model, reloaded, batch) <= 1e-4
    with peft_model.disable_adapters():  # and the adapter is not a no-op
        assert max_logit_difference(peft_model, reloaded, batch) > 1e-2
    # Tied embeddings stay tied: the head was not adapted.
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    info = json.loads((out / MERGE_INFO_NAME).read_text())
    assert info["method"] == method and info["template"] == "plain" and info["max_abs_logit_difference"] <= 1e-4


@pytest.mark.parametrize("family, overrides", [
    ("gpt2", dict(modules_to_save=["lm_head"])),  # a trained copy of the head
    ("llama", dict(target_modules=["q_proj", "lm_head"])),  # LoRA on the tied head itself
])
def test_trained_head_is_untied_and_kept(model_dirs, family, overrides, tmp_path, capsys):
    adapter = save_adapter_for(model_dirs[family], "lora", family, tmp_path / "adapter", **overrides)
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(adapter), "--out", str(out)]) == 0
    assert "UNTIED" in capsys.readouterr().out
    peft_model, reloaded, batch = unmerged_and_reloaded(model_dirs[family], adapter, out)
    assert reloaded.config.tie_word_embeddings is False
    assert reloaded.get_output_embeddings().weight is not reloaded.get_input_embeddings().weight
    assert max_logit_difference(peft_model, reloaded, batch) <= 1e-4
    base, _ = load_model_and_tokenizer(str(model_dirs[family]))  # the input embedding itself is unchanged
    assert torch.equal(reloaded.get_input_embeddings().weight, base.get_input_embeddings().weight)


def test_merged_directory_is_a_standard_model_directory(model_dirs, tmp_path):
    """Nothing in it points back to minipeft: a standard architecture, no custom code, tokenizer included."""
    from transformers import AutoTokenizer

    adapter = save_adapter_for(model_dirs["llama"], "lora", "llama", tmp_path / "adapter")
    out = tmp_path / "merged"
    merge_main(["--adapter", str(adapter), "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert "minipeft" not in (out / "config.json").read_text()
    model, tokenizer = load_model_and_tokenizer(str(model_dirs["llama"]))
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "What is the capital of France?"
    assert reloaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert reloaded_tokenizer.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("method", ["prefix", "prompt", "adapter", "bitfit", "selective"])
def test_methods_that_cannot_merge_stop_with_one_line(model_dirs, method, tmp_path, capsys):
    adapter = save_adapter_for(model_dirs["gpt2"], method, "gpt2", tmp_path / "adapter")
    out = tmp_path / "merged"
    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "cannot be merged" in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_existing_output_and_failed_check_leave_nothing_half_written(model_dirs, tmp_path, capsys):
    adapter = save_adapter_for(model_dirs["gpt2"], "lora", "gpt2", tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # --overwrite replaces only a directory minipeft wrote: the user's directory and file stay as they were.
    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 2
    assert "holds files minipeft did not write" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    # A check that cannot pass: nothing is written and no temporary directory stays behind.
    fresh = tmp_path / "fresh"
    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(fresh), "--tolerance", "1e-30"]) == 2
    assert "nothing written" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "merged"]
    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(fresh)]) == 0
    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(fresh), "--overwrite"]) == 0  # minipeft's own
    assert (fresh / "model.safetensors").is_file() and (fresh / ".minipeft").is_file()


def test_bfloat16_export_reports_its_rounding(model_dirs, tmp_path, capsys):
    adapter = save_adapter_for(model_dirs["gpt2"], "lora", "gpt2", tmp_path / "adapter")
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(adapter), "--out", str(out), "--save_dtype", "bfloat16"]) == 0
    assert "reloaded from disk, bfloat16" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
