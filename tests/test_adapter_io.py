"""Adapter files: peft's layout, exact round trips, and clear errors for files that do not fit."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_gpt2_tiny

from minipeft import LoRAConfig, UserError, get_peft_model, load_adapter


def trained_lora(model, **config):
    peft_model = get_peft_model(model, LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    return peft_model


def test_round_trip_gives_identical_logits(tiny_model_factory, sample_batch, tmp_path):
    peft_model = trained_lora(tiny_model_factory(), bias="lora_only", modules_to_save=["lm_head"])
    with torch.no_grad():
        peft_model.base_model.lm_head.modules_to_save.weight.mul_(1.5)
    expected = peft_model(**sample_batch).logits
    peft_model.save_adapter(tmp_path)
    loaded = load_adapter(tiny_model_factory(), tmp_path)
    assert torch.equal(loaded(**sample_batch).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    trainable = load_adapter(tiny_model_factory(), tmp_path, is_trainable=True)
    assert trainable.parameter_stats().trainable == peft_model.parameter_stats().trainable


def test_file_layout_is_peft_layout(gpt2_tiny, tmp_path):
    trained_lora(gpt2_tiny, target_modules=["c_attn"]).save_adapter(tmp_path, base_model_name_or_path="tiny",
                                                                      template="alpaca")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".minipeft", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == [f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{m}.weight"
                               for i in range(2) for m in "AB"]
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] is True and config["lora_alpha"] == 8 and config["r"] == 4
    assert config["target_modules"] == ["c_attn"] and config["base_model_name_or_path"] == "tiny"
    assert config["minipeft"] == {"template": "alpaca"}


def test_llama_file_names_and_gqa_shapes(llama_tiny, tmp_path):
    trained_lora(llama_tiny, target_modules=["q_proj", "k_proj"]).save_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)  # 2 kv heads
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_loading_into_a_mismatching_model_names_the_first_bad_key(gpt2_tiny, tmp_path):
    trained_lora(gpt2_tiny).save_adapter(tmp_path)
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=1000))
    with pytest.raises(UserError, match=r"tensor base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight "
                                        r"has shape \[4, 64\], this model expects \[4, 32\]"):
        load_adapter(wider, tmp_path)


def test_unexpected_and_missing_keys_are_errors(gpt2_tiny, tmp_path):
    trained_lora(gpt2_tiny).save_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({**tensors, "base_model.model.transformer.h.9.attn.c_attn.lora_A.weight": torch.zeros(4, 64)}, path)
    with pytest.raises(UserError, match=r"h\.9\.attn\.c_attn\.lora_A\.weight has no place"):
        load_adapter(make_gpt2_tiny(), tmp_path)
    del tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    save_file(tensors, path)
    with pytest.raises(UserError, match=r"h\.1\.attn\.c_attn\.lora_B\.weight is missing"):
        load_adapter(make_gpt2_tiny(), tmp_path)


def test_pickles_and_broken_files_are_refused(gpt2_tiny, tmp_path):
    trained_lora(gpt2_tiny).save_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(UserError, match="pickled adapter weights are not read"):
        load_adapter(make_gpt2_tiny(), tmp_path)
    (tmp_path / "adapter_model.bin").unlink()
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_adapter(make_gpt2_tiny(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(make_gpt2_tiny(), tmp_path)
    with pytest.raises(UserError, match="no such adapter directory"):
        load_adapter(make_gpt2_tiny(), tmp_path / "nope")


def test_unknown_peft_type_and_unknown_keys(gpt2_tiny, tmp_path):
    trained_lora(gpt2_tiny).save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["some_future_key"] = 1  # tolerated
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    load_adapter(make_gpt2_tiny(), tmp_path)
    config["peft_type"] = "LOHA"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="peft_type 'LOHA' is not supported"):
        load_adapter(make_gpt2_tiny(), tmp_path)


def test_an_adapter_with_no_tensors_is_never_saved(gpt2_tiny, tmp_path):
    peft_model = trained_lora(gpt2_tiny)
    peft_model.adapter_parameter_names = []
    with pytest.raises(UserError, match="refusing to save an adapter with no tensors"):
        peft_model.save_adapter(tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
